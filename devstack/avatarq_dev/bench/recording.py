"""Section 9: what a recorded job costs (tasks/recorder.py, a process of its own per job), and
whether recordings disturb the pacing of the streams they share a worker with. Against the
avatar emulator, whose video and audio the recorder encodes; each figure beside its baseline
from the same run: the same jobs without `record`."""

from __future__ import annotations

import statistics
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import psutil

from avatarq_dev.bench import streams
from avatarq_dev.bench.stats import make_clip, ratio, spread
from avatarq_dev.stack import LocalStack

#: Streams without and with a recording played at once in one worker (the issue's figures).
PLAIN_STREAMS = 10
RECORDED_STREAMS = 2
SAMPLE_S = 0.5


def _submit(clip: Path, lead: float, *, recorded: int, plain: int) -> list[tuple[Any, float]]:
    from producers import enqueue

    handles = []
    for i in range(recorded + plain):
        job = {"room": f"rec-{uuid.uuid4().hex[:8]}", "avatar_id": "anna", "source": str(clip)}
        handles.append((enqueue({**job, "lead": lead, "record": i < recorded}), time.time()))
    return handles


def _tree_cpu_s(proc: psutil.Process) -> float:
    """CPU seconds of the worker, its live descendants and the children it has reaped (the
    recorders and ffmpeg processes that ended during the phase)."""
    total = 0.0
    with_children = proc.cpu_times()
    total += sum(with_children[:2]) + with_children.children_user + with_children.children_system
    for child in proc.children(recursive=True):
        try:
            t = child.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            continue
    return total


class RecorderSampler:
    """The recorder processes under a worker (with their ffmpeg encoders): peak RSS per
    recorder, and each one's CPU seconds over time (start-up apart from steady recording)."""

    def __init__(self, worker: psutil.Process) -> None:
        self.worker, self.peak_mb = worker, 0.0
        #: pid -> [(monotonic time, CPU seconds of the recorder and its children)]
        self.cpu: dict[int, list[tuple[float, float]]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-recorders", daemon=True)

    def __enter__(self) -> RecorderSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_S):
            rss: list[float] = []
            for child in self.worker.children(recursive=False):
                try:
                    if "tasks.recorder" not in " ".join(child.cmdline()):
                        continue
                    tree = [child, *child.children(recursive=True)]
                    rss.append(sum(p.memory_info().rss for p in tree) / 1e6)
                    cpu = sum(sum(p.cpu_times()[:2]) for p in tree)
                    self.cpu.setdefault(child.pid, []).append((time.monotonic(), cpu))
                except psutil.Error:
                    continue
            if rss:
                self.peak_mb = max(self.peak_mb, max(rss))

    def steady_share(self) -> float | None:
        """Median CPU share of one core per recorder over the second half of its life (its
        start-up, joining and first frames, are over by then)."""
        shares = []
        for samples in self.cpu.values():
            half = samples[len(samples) // 2 :]
            if len(half) >= 2 and half[-1][0] > half[0][0]:
                shares.append((half[-1][1] - half[0][1]) / (half[-1][0] - half[0][0]))
        return round(statistics.median(shares), 4) if shares else None

    def startup_cpu_s(self) -> float | None:
        """Median CPU seconds a recorder had used at its first sample after 2 s of life."""
        firsts = []
        for samples in self.cpu.values():
            t0 = samples[0][0]
            later = [cpu for t, cpu in samples if t - t0 >= 2.0]
            if later:
                firsts.append(later[0])
        return round(statistics.median(firsts), 2) if firsts else None


def _phase(
    stack: LocalStack, worker: psutil.Process, clip: Path, lead: float, timeout: float,
    *, recorded: int, plain: int,
) -> dict[str, Any]:  # fmt: skip
    began, cpu0 = time.monotonic(), _tree_cpu_s(worker)
    with RecorderSampler(worker) as recorders:
        runs = streams.collect(stack, _submit(clip, lead, recorded=recorded, plain=plain), timeout)
    elapsed, cpu = time.monotonic() - began, _tree_cpu_s(worker) - cpu0
    done = [r.result for r in runs if r.result.get("status") == "completed"]
    plain_errors = [e for r in done if "recording" not in r for e in r["pacing_errors_ms"] or []]
    recordings = [r["recording"] for r in done if "recording" in r]
    return {
        "jobs": recorded + plain,
        "completed": len(done),
        "recordings_stored": sum(bool(r.get("url")) and not r["partial"] for r in recordings),
        "cpu_s": round(cpu, 2),
        "elapsed_s": round(elapsed, 1),
        "recorder_rss_mb": round(recorders.peak_mb, 1),
        "recorder_steady_core_share": recorders.steady_share(),
        "recorder_cpu_s_after_2s": recorders.startup_cpu_s(),
        "recording_bytes": [r["size"] for r in recordings],
        "plain_schedule_error_ms": spread(plain_errors, 2),
        "start_s": spread(
            [r["timestamps"]["first_byte"] - r["timestamps"]["picked"] for r in done], 2
        ),
    }


def bench_recording(
    stack: LocalStack, worker_env: dict[str, str], audio_s: float, lead: float, goal_p99_ms: float
) -> dict[str, Any]:
    """Two recorded jobs against two plain ones (the recorder's cost), then 10 plain streams
    beside 2 recorded ones against 12 plain ones (its effect on the others' pacing)."""
    clip = make_clip(stack.workdir / "recording.wav", audio_s, rate=16000)
    proc = stack.start_worker("recording", concurrency=PLAIN_STREAMS + RECORDED_STREAMS,
                              extra_env=worker_env)  # fmt: skip
    assert proc.proc is not None
    worker = psutil.Process(proc.proc.pid)
    timeout = audio_s + 90
    try:
        plain = _phase(stack, worker, clip, lead, timeout, recorded=0, plain=RECORDED_STREAMS)
        rec = _phase(stack, worker, clip, lead, timeout, recorded=RECORDED_STREAMS, plain=0)
        mixed_base = _phase(stack, worker, clip, lead, timeout, recorded=0,
                            plain=PLAIN_STREAMS + RECORDED_STREAMS)  # fmt: skip
        mixed = _phase(stack, worker, clip, lead, timeout, recorded=RECORDED_STREAMS,
                       plain=PLAIN_STREAMS)  # fmt: skip
    finally:
        proc.stop()
    # CPU seconds a recorded job adds over a plain one, per second of its audio.
    added = (rec["cpu_s"] - plain["cpu_s"]) / RECORDED_STREAMS
    p99 = mixed["plain_schedule_error_ms"]["p99"]
    return {
        "recording_core_share": round(added / audio_s, 4),
        "recording_rss_mb": rec["recorder_rss_mb"],
        "recording_plain_p99_ms": p99,
        "recording": {
            "audio_s_per_job": audio_s,
            "cpu_s_added_per_job": round(added, 2),
            "core_share_per_recording_job": round(added / audio_s, 4),
            "recorder_rss_mb_per_job": rec["recorder_rss_mb"],
            "recorder_steady_core_share": rec["recorder_steady_core_share"],
            "recorder_cpu_s_after_2s": rec["recorder_cpu_s_after_2s"],
            "start_s_recorded_vs_plain_p50": [rec["start_s"]["p50"], plain["start_s"]["p50"]],
            "plain_p99_ms_beside_recordings": p99,
            "plain_p99_ms_all_plain": mixed_base["plain_schedule_error_ms"]["p99"],
            "ratio_p99_beside_recordings_vs_all_plain": ratio(
                p99, mixed_base["plain_schedule_error_ms"]["p99"]
            ),
            "goal_p99_below_ms": goal_p99_ms,
            "within_goal": p99 < goal_p99_ms and mixed["completed"] == mixed["jobs"],
            "median_recording_bytes": statistics.median(rec["recording_bytes"] or [0]),
            "phases": {
                "plain": plain,
                "recorded": rec,
                "mixed_all_plain": mixed_base,
                "mixed": mixed,
            },  # fmt: skip
        },
    }
