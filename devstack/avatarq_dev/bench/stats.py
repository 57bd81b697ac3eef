"""Small measurement helpers shared by the benchmark sections: percentiles, audio clips, and a
background sampler of processes' CPU and RSS."""

from __future__ import annotations

import statistics
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from avatarq.settings import Settings
from tasks.toolkit import ffmpeg_binary

#: Encoder options per format the benchmark decodes (the formats jobs usually arrive in).
CODECS: dict[str, list[str]] = {
    "wav": ["-c:a", "pcm_s16le"],
    "mp3": ["-c:a", "libmp3lame", "-b:a", "64k"],
    "m4a": ["-c:a", "aac", "-b:a", "64k"],
    "ogg": ["-c:a", "libopus", "-b:a", "32k"],
}


def pct(values: list[float], q: float) -> float:
    """The q-quantile (0..1) by nearest rank; 0.0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def spread(values: list[float], digits: int = 3) -> dict[str, float]:
    """p50 / p95 / p99 / max of `values`, rounded."""
    return {
        "p50": round(pct(values, 0.5), digits),
        "p95": round(pct(values, 0.95), digits),
        "p99": round(pct(values, 0.99), digits),
        "max": round(max(values, default=0.0), digits),
        "n": len(values),
    }


def ratio(value: float, baseline: float) -> float | None:
    """value / baseline, None when the baseline is zero (nothing to compare with)."""
    return round(value / baseline, 3) if baseline else None


def make_clip(path: Path, seconds: float, *, rate: int = 44100) -> Path:
    """A tone of `seconds` in the format given by `path`'s suffix (see CODECS)."""
    argv = [ffmpeg_binary(Settings()), "-nostdin", "-hide_banner", "-loglevel", "error", "-y"]
    argv += ["-f", "lavfi", "-i", f"sine=frequency=440:sample_rate={rate}:duration={seconds}"]
    argv += [*CODECS[path.suffix.lstrip(".")], str(path)]
    subprocess.run(argv, check=True, timeout=120, capture_output=True)
    return path


@dataclass
class Sample:
    at: float  # time.time()
    cpu_percent: float  # of one core: the process and all its descendants
    rss_mb: float  # the process and its Python descendants (prefork children)
    ffmpeg_rss_mb: float  # its ffmpeg decoders, one per job in either design
    #: CPU seconds so far per thread name of the process itself (its profile, coarse but free
    #: of sampling overhead: LiveKit's native threads are invisible to Python profilers).
    threads: dict[str, float] = field(default_factory=dict)


@dataclass
class ProcessSampler:
    """Samples named processes (with their descendants: ffmpeg decoders, prefork children)
    every `period` seconds on a thread until stopped."""

    processes: dict[str, psutil.Process]
    period: float = 1.0
    #: Each process's CPU per thread name too (reading every thread costs CPU of its own).
    per_thread: bool = True
    samples: dict[str, list[Sample]] = field(default_factory=dict)
    #: (time.time(), % of all cores busy), whoever keeps them busy.
    machine: list[tuple[float, float]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> ProcessSampler:
        self._thread = threading.Thread(target=self._run, name="bench-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    @staticmethod
    def _read(proc: psutil.Process) -> tuple[float, float, float]:
        """CPU seconds, Python RSS and ffmpeg RSS (MB) of `proc` and its live descendants."""
        cpu = rss = ffmpeg = 0.0
        for p in [proc, *proc.children(recursive=True)]:
            try:
                t = p.cpu_times()
                cpu += t.user + t.system
                mb = p.memory_info().rss / 1e6
                if p.name() == "ffmpeg":
                    ffmpeg += mb
                else:
                    rss += mb
            except psutil.Error:  # a child (ffmpeg) ended between listing and reading
                continue
        return cpu, rss, ffmpeg

    def _run(self) -> None:
        last = {name: (time.monotonic(), self._read(p)[0]) for name, p in self.processes.items()}
        psutil.cpu_percent()  # the first call only starts the machine's count
        while not self._stop.wait(self.period):
            self.machine.append((time.time(), psutil.cpu_percent()))
            for name, proc in self.processes.items():
                now = time.monotonic()
                cpu, rss, ffmpeg = self._read(proc)
                then, cpu0 = last[name]
                last[name] = (now, cpu)
                # Ended children take their CPU seconds with them: never report a negative.
                percent = max(0.0, (cpu - cpu0) / (now - then) * 100)
                threads = thread_cpu_seconds(proc) if self.per_thread else {}
                sample = Sample(time.time(), percent, rss, ffmpeg, threads)
                self.samples.setdefault(name, []).append(sample)

    def window(self, name: str, start: float, end: float) -> list[Sample]:
        return [s for s in self.samples.get(name, []) if start <= s.at <= end]

    def cpu_rss(self, name: str, start: float, end: float) -> tuple[float, float, float]:
        """Median CPU%, peak Python RSS and peak ffmpeg RSS of `name` between `start` and
        `end` (epoch seconds)."""
        window = self.window(name, start, end)
        if not window:
            return 0.0, 0.0, 0.0
        return (
            round(statistics.median(s.cpu_percent for s in window), 1),
            round(max(s.rss_mb for s in window), 1),
            round(max(s.ffmpeg_rss_mb for s in window), 1),
        )

    def busy(self, start: float, end: float) -> dict[str, float]:
        """How busy all cores were between `start` and `end`: p50 / p90 of the samples (% of
        all cores) and the share of samples at 90 % or more."""
        window = [busy for at, busy in self.machine if start <= at <= end]
        return {
            "p50": round(pct(window, 0.5), 1),
            "p90": round(pct(window, 0.9), 1),
            "saturated_share": ratio(sum(b >= 90 for b in window), len(window)) or 0.0,
            "n": len(window),
        }

    def thread_cpu(self, name: str, start: float, end: float) -> dict[str, float]:
        """CPU % of one core per thread name of `name` between `start` and `end`."""
        window = self.window(name, start, end)
        if len(window) < 2:
            return {}
        first, last = window[0], window[-1]
        seconds = last.at - first.at
        return {
            thread: round((cpu - first.threads.get(thread, 0.0)) / seconds * 100, 1)
            for thread, cpu in sorted(last.threads.items(), key=lambda kv: -kv[1])
        }


def thread_cpu_seconds(proc: psutil.Process) -> dict[str, float]:
    """CPU seconds per thread name (threads of one name, e.g. tokio's workers, summed)."""
    out: dict[str, float] = {}
    try:
        threads = proc.threads()
    except psutil.Error:
        return out
    for t in threads:
        try:
            name = Path(f"/proc/{proc.pid}/task/{t.id}/comm").read_text().strip()
        except OSError:  # the thread ended
            continue
        out[name] = out.get(name, 0.0) + t.user_time + t.system_time
    return out
