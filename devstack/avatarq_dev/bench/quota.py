"""The start latency a session slot adds (tasks/link/quota.py) when one is free, against a
throwaway Redis: take and give back a slot, `rounds` times, and compare with a plain Redis
round trip (PING) on the same connection, the floor any Redis-backed quota pays."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from avatarq_dev.bench.stats import pct, ratio
from avatarq_dev.processes import RedisServer
from tasks.toolkit import AvatarQuota, Slot


async def _measure(url: str, rounds: int, time_limit: float) -> dict[str, Any]:
    redis = aioredis.from_url(url)
    quota = AvatarQuota(redis, "bench", 10)
    take: list[float] = []
    ping: list[float] = []
    deadline = time.monotonic() + time_limit
    try:
        for i in range(rounds):
            t0 = time.perf_counter()
            slot = await quota.try_acquire(f"job-{i}")
            take.append(time.perf_counter() - t0)
            assert isinstance(slot, Slot), slot  # the quota is never full here
            await quota.release(slot)
            t0 = time.perf_counter()
            await redis.ping()  # type: ignore[misc]
            ping.append(time.perf_counter() - t0)
            if time.monotonic() > deadline:
                break
    finally:
        await redis.aclose()
    take_p50, ping_p50 = pct(take, 0.5), pct(ping, 0.5)
    return {
        "slot_take_p50_ms": round(take_p50 * 1000, 3),
        "quota": {
            "rounds": len(take),
            "slot_take_p50_ms": round(take_p50 * 1000, 3),
            "slot_take_p99_ms": round(pct(take, 0.99) * 1000, 3),
            "redis_ping_p50_ms": round(ping_p50 * 1000, 3),
            "slot_take_vs_ping": ratio(take_p50, ping_p50),
        },
    }


def bench_quota(workdir: Path, rounds: int = 2000, time_limit: float = 20.0) -> dict[str, Any]:
    """Slot-taking latency (goal: p50 < 10 ms) on a free quota."""
    server = RedisServer(log_dir=workdir / "logs")
    with server:
        return asyncio.run(_measure(server.url, rounds, time_limit))


if __name__ == "__main__":
    import json
    import sys
    import tempfile

    print(
        json.dumps(
            bench_quota(Path(tempfile.mkdtemp()), int(sys.argv[1]) if sys.argv[1:] else 2000)
        )
    )
