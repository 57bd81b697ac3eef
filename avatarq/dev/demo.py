"""`avatarq demo`: the whole product on the embedded local stack, in one command."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from importlib import resources
from pathlib import Path
from typing import Any

from rich.console import Console

from avatarq.dev.stack import HOST, local_stack

NETNS_RUN = Path(__file__).resolve().parents[2] / "infra" / "netns-run"
DEMO_TIMEOUT_S = 300.0
console = Console(stderr=True)


def sample_path() -> Path:
    return Path(str(resources.files("avatarq") / "assets" / "sample.ogg"))


def run_in_netns(argv: list[str]) -> int:
    """Re-run this command inside a private network namespace (see infra/netns-run)."""
    cmd = [str(NETNS_RUN), sys.executable, "-m", "avatarq", *argv]
    return subprocess.call(cmd)


def run_demo(
    *,
    source: str | dict[str, Any] | None = None,
    workdir: Path | None = None,
    show_progress: bool = True,
) -> dict[str, Any]:
    """`source` is audio or a `tts` source (rendered by `producers.enqueue` before sending)."""
    from avatarq.commands.common import follow
    from avatarq.settings import get_settings

    source = source or str(sample_path())
    with local_stack(workdir) as stack:
        console.print(
            f"local stack up in {stack.workdir}: LiveKit {stack.livekit_url}, "
            f"avatar emulator {stack.avatar_url}, Redis {stack.redis.url}"
        )
        stack.start_worker("demo", concurrency=4)
        metrics_url = f"http://{HOST}:{stack.metrics_ports['demo']}/metrics"
        console.print(f"worker metrics (Prometheus) at {metrics_url}")
        # Point this process's producer at the stack, as a user's environment would.
        os.environ.update(stack.env())
        get_settings.cache_clear()
        from producers import enqueue

        started = time.monotonic()
        handle = enqueue({"room": "demo", "avatar_id": "demo", "source": source})
        result = follow(handle.job_id, timeout=DEMO_TIMEOUT_S, show_progress=show_progress)
        wall = time.monotonic() - started
        summary = summarize(result, wall, stack.recordings)
        summary["metrics_url"] = metrics_url
        summary["metrics_jobs_completed"] = scrape(metrics_url, "avatarq_jobs_completed_total")
        if show_progress:
            for key, value in summary.items():
                console.print(f"  {key}: {value}")
        return summary


def scrape(url: str, metric: str) -> float | None:
    """One sample's value from a Prometheus text page (None if absent or unreachable)."""
    try:
        with urllib.request.urlopen(url, timeout=5) as page:
            text = page.read().decode()
    except OSError:
        return None
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name == metric:
            return float(value)
    return None


def summarize(result: dict[str, Any], wall_s: float, recordings: Path) -> dict[str, Any]:
    ts = result.get("timestamps") or {}
    audio = result.get("audio_duration") or 0.0

    def span(a: str, b: str) -> float | None:
        return round(ts[b] - ts[a], 3) if ts.get(a) and ts.get(b) else None

    wavs = sorted(recordings.glob("*.wav")) if recordings.exists() else []
    return {
        "job_id": result.get("job_id"),
        "status": result.get("status"),
        "error": result.get("error"),
        "audio_seconds": audio,
        "wall_seconds": round(wall_s, 3),
        "real_time_factor": round(wall_s / audio, 3) if audio else None,
        "join_s": span("picked", "room_joined"),
        "avatar_ready_s": span("room_joined", "avatar_ready"),
        "streaming_s": span("first_byte", "last_byte"),
        "playback_finished_after_last_byte_s": span("last_byte", "playback_finished"),
        "playback_position": result.get("playback_position"),
        "received_wav": str(wavs[-1]) if wavs else None,
    }
