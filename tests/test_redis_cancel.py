"""A playing job's lease watch stops when its run lets go, whenever that happens, on a real
Redis and the product's Redis client. It stops by cancellation, which a command in flight
may lose: the client's socket timeout sends each command under `asyncio.wait_for`, which on
Python 3.11 drops a cancellation landing as the send completes (nearly every release here,
ticks back to back), and redis-py 8.1 and 8.2 lose about one in seven besides (the pin
`redis<8` in pyproject.toml). The watch is then cancelled again until it stops
(avatarq/redisclient.py `cancel_and_wait`); without that the run waited for ever on a watch
that kept renewing the lease, and its room stayed wedged."""

from __future__ import annotations

import asyncio
import contextlib
import random
import uuid
from collections.abc import Awaitable, Callable

import pytest

from avatarq import redisclient
from avatarq.jobs import parse_job
from avatarq.ledger.keys import job_lease_key, room_order_key
from avatarq.ledger.types import Claim
from avatarq.ledger.worker import Ledger
from avatarq.settings import Settings
from tasks.control import JobControl, StopReason
from tasks.hooks import LeaseWatch
from tasks.link import quota as quota_module
from tasks.link.quota import AvatarQuota, Slot

#: Releases at random moments of a tick: enough to hit a command in flight many times over
#: (a lost cancellation showed in 70 of 500 on redis-py 8.2).
RELEASES = 100
#: Ticks back to back: most releases land while a command is on the wire.
TICK_S = 0.001


def test_a_lease_watch_stops_whenever_its_run_lets_go(redis_server: str) -> None:
    settings = Settings(redis_url=redis_server)
    room = f"cancel-{uuid.uuid4().hex[:8]}"
    job = parse_job({"room": room, "avatar_id": "a", "source": "/x.wav"}, settings)

    async def go() -> list[int]:
        client = redisclient.async_client(redis_server)
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


def test_a_held_session_slot_is_released_whenever_its_link_lets_go(
    redis_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same for a slot's renewer: a release it did not stop for would wait for ever on a
    renewer that keeps the slot, and the fleet would be a session short."""
    # Renewals back to back (every 5 s by default), so that releases land inside a command.
    monkeypatch.setattr(quota_module, "RENEW_EVERY_S", TICK_S)

    async def go() -> list[int]:
        client = redisclient.async_client(redis_server)
        quota = AvatarQuota(client, f"cancel-{uuid.uuid4().hex[:6]}", 1)
        stuck = []
        rng = random.Random(2)
        try:
            for i in range(RELEASES):
                slot = await quota.try_acquire(f"job-{i}")
                assert isinstance(slot, Slot), f"release {i - 1} left its slot held: {slot}"
                quota.hold(slot)
                await asyncio.sleep(rng.uniform(0, 5 * TICK_S))
                release = asyncio.ensure_future(quota.release(slot))
                if not (await asyncio.wait({release}, timeout=2.0))[0]:
                    stuck.append(i)
                    break
        finally:
            await client.aclose()
        return stuck

    assert asyncio.run(go()) == []


def test_a_task_whose_cancellation_was_dropped_is_cancelled_again() -> None:
    """Python 3.11's `wait_for` drops a cancellation that lands as what it waits for
    completes: a plain cancel-and-await then waits for ever on a task that goes on."""

    async def go(stop: Callable[[asyncio.Task[None]], Awaitable[None]]) -> bool:
        woken = asyncio.Event()

        async def loop() -> None:
            while True:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(woken.wait(), 10.0)
                woken.clear()

        task = asyncio.create_task(loop())
        await asyncio.sleep(0.01)
        woken.set()  # what the task waits for completes ...
        stopping = asyncio.ensure_future(stop(task))  # ... as it is cancelled
        done = bool((await asyncio.wait({stopping}, timeout=1.0))[0])
        task.cancel()
        await asyncio.gather(task, stopping, return_exceptions=True)
        return done

    async def cancel_once(task: asyncio.Task[None]) -> None:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    assert not asyncio.run(go(cancel_once))
    assert asyncio.run(go(redisclient.cancel_and_wait))
