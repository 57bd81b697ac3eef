"""Section 5: enqueue throughput into a throwaway Redis with no worker attached.

Baseline: Celery's own `send_task` of the same payload, so the ratio is what avatarq's
validation, idempotency key and room order (one Lua script per job) cost on top of Celery.
Pickup latency needs a worker and is measured with the overhead jobs (streams.py).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from avatarq.celeryconfig import RENDER_QUEUE, RENDER_TASK
from avatarq.settings import get_settings
from avatarq_dev.bench.stats import ratio
from avatarq_dev.processes import RedisServer


@contextmanager
def settings_env(env: dict[str, str]) -> Iterator[None]:
    """Point this process's settings (producers) at `env` for the block."""
    saved = dict(os.environ)
    os.environ.update(env)
    get_settings.cache_clear()
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)
        get_settings.cache_clear()


def bench_queue(workdir: Path, clip: Path, jobs: int, time_limit: float) -> dict[str, Any]:
    from producers import enqueue, enqueue_many
    from producers.client import celery_app

    def job(i: int, kind: str) -> dict[str, Any]:
        return {"room": f"q-{kind}-{i}", "avatar_id": "anna", "source": str(clip)}

    def rate(fn: Any, kind: str) -> float:
        """Jobs/s of `fn`, which returns how many jobs it enqueued."""
        start = time.perf_counter()
        done = fn(kind)
        return done / (time.perf_counter() - start)

    def single(kind: str) -> int:
        deadline = time.monotonic() + time_limit
        for i in range(jobs):
            enqueue(job(i, kind))
            if time.monotonic() > deadline:
                return i + 1
        return jobs

    def bulk(kind: str) -> int:
        enqueue_many([job(i, kind) for i in range(jobs)])
        return jobs

    def plain_celery(kind: str) -> int:
        app = celery_app(get_settings())
        deadline = time.monotonic() + time_limit
        for i in range(jobs):
            app.send_task(RENDER_TASK, args=[job(i, kind)], queue=RENDER_QUEUE)
            if time.monotonic() > deadline:
                return i + 1
        return jobs

    redis = RedisServer(log_dir=workdir / "logs")
    with redis, settings_env({"REDIS_URL": redis.url}):
        baseline = rate(plain_celery, "celery")
        ours_single = rate(single, "single")
        ours_bulk = rate(bulk, "bulk")
    return {
        "enqueue_jobs_per_s": round(ours_single, 1),
        "queue": {
            "jobs": jobs,
            "enqueue_single_jobs_per_s": round(ours_single, 1),
            "enqueue_bulk_jobs_per_s": round(ours_bulk, 1),
            "baseline_celery_send_task_jobs_per_s": round(baseline, 1),
            "ratio_single_vs_baseline": ratio(ours_single, baseline),
            "ratio_bulk_vs_baseline": ratio(ours_bulk, baseline),
        },
    }
