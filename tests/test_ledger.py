"""The ledger's guarantees against a real Redis: exactly-once playback, one voice per room in
enqueue order, cancellation before start, leases that expire with their worker."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import redis
import redis.asyncio as aioredis

from avatarq.events import job_enqueued_key, job_lease_key, job_record_key, room_order_key
from avatarq.settings import Settings
from producers.client import cancel, enqueue
from tasks.ledger import Claim, Ledger


def run(redis_url: str, body: Callable[[Ledger], Awaitable[Any]], stale: float = 3600) -> Any:
    async def go() -> Any:
        client = aioredis.from_url(redis_url)
        try:
            return await body(Ledger(client, stale_after_s=stale))
        finally:
            await client.aclose()

    return asyncio.run(go())


def room() -> str:
    return f"room-{uuid.uuid4().hex[:8]}"


def test_room_plays_in_enqueue_order_one_at_a_time(redis_server: str) -> None:
    r = room()
    settings = Settings(REDIS_URL=redis_server, CELERY_BROKER_URL=redis_server)
    ids = [f"j{i}-{r}" for i in range(3)]
    for job_id in ids:
        enqueue(
            {"job_id": job_id, "room": r, "avatar_id": "a", "source": "a.wav"}, settings=settings
        )

    async def body(ledger: Ledger) -> list[str]:
        order = []
        # Claims arrive in the wrong order: only the head may play, and only one at a time.
        assert (await ledger.claim(ids[2], r, "t2"))[0] is Claim.WAIT
        assert (await ledger.claim(ids[1], r, "t1"))[0] is Claim.WAIT
        for job_id in ids:
            verdict, attempt = await ledger.claim(job_id, r, f"t-{job_id}")
            assert (verdict, attempt) == (Claim.OK, 1)
            later = [j for j in ids if j != job_id and j not in order]
            for other in later:
                assert (await ledger.claim(other, r, f"x-{other}"))[0] is Claim.WAIT
            order.append(job_id)
            assert await ledger.finish(job_id, r, {"job_id": job_id, "status": "completed"})
        return order

    assert run(redis_server, body) == ids
    assert redis.Redis.from_url(redis_server).llen(room_order_key(r)) == 0


def test_ended_job_is_never_played_again(redis_server: str) -> None:
    r = room()

    async def body(ledger: Ledger) -> None:
        assert (await ledger.claim("once", r, "t1"))[0] is Claim.OK
        assert await ledger.finish("once", r, {"job_id": "once", "status": "completed"})
        assert (await ledger.claim("once", r, "t2"))[0] is Claim.DONE
        # A second terminal record never replaces the first.
        assert not await ledger.finish("once", r, {"job_id": "once", "status": "failed"})

    run(redis_server, body)
    record = json.loads(redis.Redis.from_url(redis_server).get(job_record_key("once")))
    assert record["status"] == "completed"


def test_duplicate_delivery_meets_the_lease(redis_server: str) -> None:
    r = room()

    async def body(ledger: Ledger) -> None:
        assert (await ledger.claim("dup", r, "worker-1"))[0] is Claim.OK
        assert (await ledger.claim("dup", r, "worker-2"))[0] is Claim.BUSY
        assert await ledger.renew("dup", "worker-1")
        assert not await ledger.renew("dup", "worker-2")
        # The first worker dies: once its lease lapses the job plays again, as attempt 2.
        await ledger.redis.pexpire(job_lease_key("dup"), 1)
        await asyncio.sleep(0.05)
        assert await ledger.claim("dup", r, "worker-2") == (Claim.OK, 2)

    run(redis_server, body)


def test_cancel_before_start(redis_server: str) -> None:
    r = room()
    settings = Settings(REDIS_URL=redis_server, CELERY_BROKER_URL=redis_server)
    enqueue(
        {"job_id": "c1-" + r, "room": r, "avatar_id": "a", "source": "a.wav"}, settings=settings
    )
    assert cancel("c1-" + r, settings=settings) == "queued"

    async def body(ledger: Ledger) -> None:
        assert (await ledger.claim("c1-" + r, r, "t"))[0] is Claim.CANCELLED

    run(redis_server, body)


def test_cancel_reports_playing_and_ended(redis_server: str) -> None:
    r = room()
    settings = Settings(REDIS_URL=redis_server, CELERY_BROKER_URL=redis_server)

    async def start(ledger: Ledger) -> None:
        assert (await ledger.claim("p1", r, "t"))[0] is Claim.OK

    run(redis_server, start)
    assert cancel("p1", settings=settings) == "playing"

    async def check_and_end(ledger: Ledger) -> None:
        assert await ledger.cancel_requested("p1")
        await ledger.finish("p1", r, {"job_id": "p1", "status": "cancelled"})

    run(redis_server, check_and_end)
    assert cancel("p1", settings=settings) == "ended"


def test_same_job_id_enqueued_five_times_is_sent_once(redis_server: str) -> None:
    r = room()
    settings = Settings(REDIS_URL=redis_server, CELERY_BROKER_URL=redis_server)
    client = redis.Redis.from_url(redis_server)
    before = client.llen("avatarq")
    job = {"job_id": "five-" + r, "room": r, "avatar_id": "a", "source": "a.wav"}
    handles = [enqueue(job, settings=settings) for _ in range(5)]
    assert [h.created for h in handles] == [True, False, False, False, False]
    assert client.llen("avatarq") - before == 1
    assert client.lrange(room_order_key(r), 0, -1) == [job["job_id"].encode()]


def test_lost_head_stops_blocking_its_room(redis_server: str) -> None:
    r = room()
    client = redis.Redis.from_url(redis_server)
    # A job whose message vanished (e.g. a broker that lost its data): queued, never touched.
    client.rpush(room_order_key(r), "lost")
    client.hset(job_enqueued_key("lost"), mapping={"ts": time.time() - 10, "room": r})

    async def body(ledger: Ledger) -> None:
        assert (await ledger.claim("next", r, "t"))[0] is Claim.OK

    run(redis_server, body, stale=5)
    assert client.lrange(room_order_key(r), 0, -1) == [b"next"]

    async def young(ledger: Ledger) -> None:
        client.rpush(room_order_key(r + "y"), "queued-recently")
        client.hset(job_enqueued_key("queued-recently"), mapping={"ts": time.time(), "room": r})
        assert (await ledger.claim("behind", r + "y", "t"))[0] is Claim.WAIT

    run(redis_server, young, stale=5)
