"""A room's lane against a real Redis: a job behind its room's playing job parks, the playing
job hands it on at its end (from the ledger, if its message has not come yet), nobody's late
watch tick revives a released lease, and a parked job that nobody will hand on is found by
the sweep."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis

from avatarq.ledger.keys import (
    LANES_KEY,
    job_enqueued_key,
    job_lease_key,
    room_lane_key,
    room_order_key,
    worker_held_key,
)
from avatarq.ledger.sweeps import Sweeps
from avatarq.ledger.types import Claim, Handoff, Parked
from avatarq.ledger.worker import REJOIN_GRACE_S, Ledger
from avatarq.settings import Settings
from producers.client import enqueue
from tests.producing import own_db


@pytest.fixture
def redis_server(redis_server: str) -> str:
    """A database of this module's own: its jobs are registered without a broker message,
    which a live worker of another module on the shared one would take for lost, and send."""
    return own_db(redis_server, 13)


def run(redis_url: str, body: Callable[[Ledger], Awaitable[Any]]) -> Any:
    async def go() -> Any:
        client = aioredis.from_url(redis_url)
        try:
            return await body(Ledger(client, stale_after_s=3600))
        finally:
            await client.aclose()

    return asyncio.run(go())


def enqueued_room(redis_url: str, n: int) -> tuple[str, list[str]]:
    settings = Settings(REDIS_URL=redis_url, CELERY_BROKER_URL="memory://")
    room = f"lane-{uuid.uuid4().hex[:8]}"
    ids = [f"{room}-j{i}" for i in range(n)]
    for job_id in ids:
        job = {"job_id": job_id, "room": room, "avatar_id": "a", "source": "a.wav"}
        enqueue(job, settings=settings)
    return room, ids


def done(job_id: str) -> dict[str, Any]:
    return {"job_id": job_id, "status": "completed"}


def test_jobs_behind_the_playing_one_park_and_are_handed_on_in_order(redis_server: str) -> None:
    room, ids = enqueued_room(redis_server, 3)

    async def body(ledger: Ledger) -> list[str]:
        assert (await ledger.claim(ids[0], room, "w1/a"))[0] is Claim.OK
        # The later jobs arrive out of order; each parks (its message can be acknowledged).
        for job_id in (ids[2], ids[1]):
            park = Handoff(job_id, {"job_id": job_id, "room": room})
            assert (await ledger.claim(job_id, room, f"w2/{job_id}", park=park))[0] is Claim.PARKED
        played, token, current = [ids[0]], "w1/a", ids[0]
        while True:
            finish = await ledger.finish(current, room, done(current), token=token)
            assert finish.recorded and finish.ours
            if finish.next is None:
                return played
            # The handed-on job is this worker's now: its held deliveries name it.
            held = await ledger.redis.hget(worker_held_key("w1"), finish.next.task_id)
            assert json.loads(held) == finish.next.payload
            current, token = finish.next.task_id, f"w1/{finish.next.task_id}"
            assert (await ledger.claim(current, room, token))[0] is Claim.OK
            played.append(current)

    assert run(redis_server, body) == ids
    client = redis.Redis.from_url(redis_server)
    assert not client.exists(room_lane_key(room)) and not client.sismember(LANES_KEY, room)


def test_a_next_job_still_in_the_broker_is_handed_on_from_its_registration(
    redis_server: str,
) -> None:
    """The room's next job has not reached a worker (its message is behind other rooms'
    jobs): the playing job's end hands it on from the ledger, and its message, when it
    comes, finds it playing or ended. A next job a worker has seen comes by its delivery."""
    room, ids = enqueued_room(redis_server, 3)
    registered = json.loads(
        redis.Redis.from_url(redis_server).hget(job_enqueued_key(ids[1]), "job")
    )

    async def body(ledger: Ledger) -> None:
        assert (await ledger.claim(ids[0], room, "w1/a"))[0] is Claim.OK
        assert (await ledger.claim(ids[2], room, "w3/x"))[0] is Claim.WAIT  # seen, not parked
        finish = await ledger.finish(ids[0], room, done(ids[0]), token="w1/a")
        assert finish.next == Handoff(ids[1], registered)
        held = await ledger.redis.hget(worker_held_key("w1"), ids[1])
        assert json.loads(held) == registered
        assert (await ledger.claim(ids[1], room, "w1/b"))[0] is Claim.OK
        assert (await ledger.claim(ids[1], room, "w2/c"))[0] is Claim.BUSY  # its message
        finish = await ledger.finish(ids[1], room, done(ids[1]), token="w1/b")
        assert finish.recorded and finish.next is None
        assert (await ledger.claim(ids[1], room, "w2/c"))[0] is Claim.DONE
        assert await ledger.record(ids[1]) == done(ids[1])

    run(redis_server, body)


def test_without_lanes_a_job_end_hands_nothing_on(redis_server: str) -> None:
    room, ids = enqueued_room(redis_server, 2)

    async def body(ledger: Ledger) -> None:
        assert (await ledger.claim(ids[0], room, "w1/a"))[0] is Claim.OK
        finish = await ledger.finish(ids[0], room, done(ids[0]), token="w1/a", hand_on=False)
        assert finish.recorded and finish.next is None
        assert not await ledger.redis.hexists(worker_held_key("w1"), ids[1])

    run(redis_server, body)


def test_a_released_lease_is_never_renewed_by_a_late_watch_tick(redis_server: str) -> None:
    room, (job_id,) = enqueued_room(redis_server, 1)

    async def body(ledger: Ledger) -> None:
        assert await ledger.claim(job_id, room, "w1/a") == (Claim.OK, 1)
        assert await ledger.release(job_id, room, "w1/a")
        # A tick of the released attempt that runs late learns it no longer holds the job...
        assert await ledger.watch(job_id, room, "w1/a") == (False, False)
        # ...and the job's next delivery is not mistaken for a duplicate of it.
        assert await ledger.claim(job_id, room, "w2/b") == (Claim.OK, 2)
        # The first attempt, taken over, can neither release nor record anything.
        assert not await ledger.release(job_id, room, "w1/a")
        finish = await ledger.finish(job_id, room, done(job_id), token="w1/a")
        assert not finish.recorded and not finish.ours
        assert (await ledger.finish(job_id, room, done(job_id), token="w2/b")).recorded

    run(redis_server, body)
    assert not redis.Redis.from_url(redis_server).exists(job_lease_key(job_id))


def test_a_parked_job_nobody_hands_on_is_taken_once_by_the_sweep(redis_server: str) -> None:
    room, ids = enqueued_room(redis_server, 2)

    async def body(ledger: Ledger) -> None:
        assert (await ledger.claim(ids[0], room, "w1/a"))[0] is Claim.OK
        park = Handoff(ids[1], {"job_id": ids[1], "room": room})
        assert (await ledger.claim(ids[1], room, "w2/b", park=park))[0] is Claim.PARKED
        assert await Sweeps(ledger).take_stranded() == []  # its room's job will hand it on
        # The head's lease lapses and it ends on a path that hands nothing on (a token that
        # names no worker process).
        await ledger.redis.delete(job_lease_key(ids[0]))
        finish = await ledger.finish(ids[0], room, done(ids[0]), token="no-worker")
        assert finish.recorded and finish.next is None and finish.ours
        taken = await asyncio.gather(Sweeps(ledger).take_stranded(), Sweeps(ledger).take_stranded())
        assert sorted(len(t) for t in taken) == [0, 1]
        assert [h for t in taken for h in t] == [park]

    run(redis_server, body)


def test_a_lost_head_does_not_strand_the_lane(redis_server: str) -> None:
    """A head whose message is gone (never claimed, untouched past the redelivery window) is
    dropped by the sweep, and the parked job behind it is published."""
    room, ids = enqueued_room(redis_server, 2)

    async def body(ledger: Ledger) -> list[Handoff]:
        park = Handoff(ids[1], {"job_id": ids[1], "room": room})
        assert (await ledger.claim(ids[1], room, "w2/b", park=park))[0] is Claim.PARKED
        ledger.stale_after_s = 0.0
        await asyncio.sleep(0.01)
        return await Sweeps(ledger).take_stranded()

    assert run(redis_server, body) == [Handoff(ids[1], {"job_id": ids[1], "room": room})]


def test_a_head_handed_on_after_a_long_wait_is_not_taken_for_lost(redis_server: str) -> None:
    """A job parked longer than the redelivery window is handed on: until its new holder
    claims it, it has no lease and no lane entry, but it is not lost, and the room's order
    keeps it at the head."""
    room, ids = enqueued_room(redis_server, 3)

    async def body(ledger: Ledger) -> list[str]:
        assert (await ledger.claim(ids[0], room, "w1/a"))[0] is Claim.OK
        for job_id in ids[1:]:
            park = Handoff(job_id, {"job_id": job_id, "room": room})
            assert (await ledger.claim(job_id, room, f"w2/{job_id}", park=park))[0] is Claim.PARKED
        ledger.stale_after_s = 0.5  # the window, shortened: the parked jobs waited past it
        await asyncio.sleep(0.6)
        finish = await ledger.finish(ids[0], room, done(ids[0]), token="w1/a")
        assert finish.next is not None and finish.next.task_id == ids[1]
        await ledger.drop_finished_heads(None, room)  # another claim, or a sweep, meanwhile
        order = await ledger.redis.lrange(room_order_key(room), 0, -1)
        return [job_id.decode() for job_id in order]

    assert run(redis_server, body) == ids[1:]


def test_a_parked_job_is_kept_by_its_worker_through_a_redis_that_lost_it(
    redis_server: str,
) -> None:
    room, ids = enqueued_room(redis_server, 2)
    parked = {ids[1]: Parked(ids[1], room, {"job_id": ids[1], "room": room})}

    async def body(ledger: Ledger) -> None:
        assert (await ledger.claim(ids[0], room, "w1/a"))[0] is Claim.OK
        park = Handoff(ids[1], parked[ids[1]].payload)
        assert (await ledger.claim(ids[1], room, "w2/b", park=park))[0] is Claim.PARKED
        assert await Sweeps(ledger).keep_parked(parked) == {ids[1]}
        # Redis loses its data: the parking worker's next beat puts the job back in its lane.
        await ledger.redis.delete(room_lane_key(room), room_order_key(room), LANES_KEY)
        assert await Sweeps(ledger).keep_parked(parked) == {ids[1]}
        assert await ledger.redis.lrange(room_order_key(room), 0, -1) == [ids[1].encode()]
        # The playing job re-asserts its place at the head, then hands the parked one on.
        assert await ledger.watch(ids[0], room, "w1/a") == (False, True)
        finish = await ledger.finish(ids[0], room, done(ids[0]), token="w1/a")
        assert finish.next == park
        assert await Sweeps(ledger).keep_parked(parked) == {ids[1]}  # handed on, not yet claimed
        # Put back in the order, it starts only after the rejoin grace.
        assert (await ledger.claim(ids[1], room, "w1/c"))[0] is Claim.WAIT
        await asyncio.sleep(REJOIN_GRACE_S + 0.1)
        assert (await ledger.claim(ids[1], room, "w1/c"))[0] is Claim.OK
        assert await Sweeps(ledger).keep_parked(parked) == set()  # it plays: the parker lets go

    run(redis_server, body)
