"""Measure a worker's cost per concurrent stream on the local stack.

    infra/netns-run env PYTHONPATH=. .venv/bin/python bench/bench_worker_streams.py [--streams 8]

Starts the embedded stack and one Celery worker, enqueues `--streams` jobs of `--seconds` of
audio at once, and samples the worker process's CPU and RSS (psutil) while they all play.
Prints one JSON object: the worker's idle RSS, its CPU% and RSS with every stream playing, and
the per-stream figures docs/capacity.md is derived from. The local LiveKit server and the
avatar emulator are stand-ins (their cost is not LiveKit's or a GPU avatar's), so only the
worker figures carry over to production.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import psutil

from avatarq.dev.stack import local_stack
from avatarq.settings import get_settings
from tests import audio

SAMPLE_PERIOD_S = 1.0


def measure(streams: int, seconds: float) -> dict[str, Any]:
    with local_stack() as stack:
        worker = stack.start_worker("bench", concurrency=streams)
        assert worker.proc is not None
        proc = psutil.Process(worker.proc.pid)
        idle_rss_mb = proc.memory_info().rss / 1e6
        os.environ.update(stack.env())
        get_settings.cache_clear()
        from producers import enqueue, get_status
        from producers.client import is_terminal

        clip = audio.tone(Path(stack.workdir) / "clip.wav", seconds=seconds)
        handles = [
            enqueue({"room": f"bench-{i}", "avatar_id": f"a{i}", "source": str(clip)})
            for i in range(streams)
        ]
        cpu, rss = [], []
        proc.cpu_percent(None)
        deadline = time.monotonic() + seconds * 3 + 60
        while time.monotonic() < deadline:
            time.sleep(SAMPLE_PERIOD_S)
            states = [get_status(h.job_id) for h in handles]
            playing = sum(s.get("status") == "playing" for s in states)
            sample = proc.cpu_percent(None)
            if playing == streams:
                cpu.append(sample)
                rss.append(proc.memory_info().rss / 1e6)
            if all(is_terminal(s) for s in states):
                break
        completed = sum(s.get("status") == "completed" for s in states)
    if not cpu:
        raise SystemExit("never saw every stream playing at once: lower --streams")
    cpu_all, rss_all = statistics.median(cpu), max(rss)
    return {
        "streams": streams,
        "audio_seconds": seconds,
        "completed": completed,
        "samples": len(cpu),
        "worker_rss_mb_idle": round(idle_rss_mb, 1),
        "worker_rss_mb_all_playing": round(rss_all, 1),
        "worker_cpu_percent_all_playing": round(cpu_all, 1),
        "worker_cpu_percent_per_stream": round(cpu_all / streams, 2),
        "worker_rss_mb_per_stream": round((rss_all - idle_rss_mb) / streams, 2),
        "cpus": psutil.cpu_count(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args(argv)
    if os.environ.get("AVATARQ_IN_NETNS") != "1":
        print("run inside infra/netns-run (libwebrtc ignores loopback)", file=sys.stderr)
        return 2
    print(json.dumps(measure(args.streams, args.seconds), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
