"""A playing job's lease watch stops when its run lets go, whenever that happens, on a real
Redis. It stops by cancellation, so this holds only while redis-py's asyncio client lets a
cancellation through: 8.1 and 8.2 lose about one in seven that land inside a command, and
the run then waits for ever on a watch that keeps renewing the lease (the room stays wedged:
the pin `redis<8` in pyproject.toml). Lift the pin once this passes on the new version."""

from __future__ import annotations

import asyncio
import random
import uuid

import redis.asyncio as aioredis

from avatarq.jobs import parse_job
from avatarq.ledger.keys import job_lease_key, room_order_key
from avatarq.ledger.types import Claim
from avatarq.ledger.worker import Ledger
from avatarq.settings import Settings
from tasks.control import JobControl, StopReason
from tasks.hooks import LeaseWatch

#: Releases at random moments of a tick: enough to hit a command in flight many times over
#: (a lost cancellation showed in 70 of 500 on redis-py 8.2).
RELEASES = 300
#: Ticks back to back: most releases land while a command is on the wire.
TICK_S = 0.001


def test_a_lease_watch_stops_whenever_its_run_lets_go(redis_server: str) -> None:
    settings = Settings(redis_url=redis_server)
    room = f"cancel-{uuid.uuid4().hex[:8]}"
    job = parse_job({"room": room, "avatar_id": "a", "source": "/x.wav"}, settings)

    async def go() -> list[int]:
        client = aioredis.from_url(redis_server)
        ledger = Ledger(client, stale_after_s=3600)
        await client.rpush(room_order_key(job.room), job.job_id)  # as enqueue does
        assert (await ledger.claim(job.job_id, job.room, "w/t"))[0] is Claim.OK
        stuck = []
        rng = random.Random(1)
        try:
            for i in range(RELEASES):
                control = JobControl()
                watch = LeaseWatch(ledger, job, "w/t", control, lambda: False, TICK_S)
                await watch.on_claimed()
                await asyncio.sleep(rng.uniform(0, 5 * TICK_S))
                # Not wait_for: its own cancel of a stuck release would be lost the same way.
                release = asyncio.ensure_future(watch.on_released())
                if not (await asyncio.wait({release}, timeout=2.0))[0]:
                    stuck.append(i)
                    control.request_stop(StopReason.CANCELLED)  # the watch's own way out
                    await release
                    break
            # Nothing renews the lease once the last watch let go.
            await client.set(job_lease_key(job.job_id), "gone")
            await asyncio.sleep(20 * TICK_S)
            assert await client.get(job_lease_key(job.job_id)) == b"gone"
        finally:
            await client.aclose()
        return stuck

    assert asyncio.run(go()) == []
