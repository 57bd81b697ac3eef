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

from avatarq.ledger.keys import (
    WORKERS_KEY,
    job_enqueued_key,
    job_lease_key,
    job_record_key,
    room_holder_key,
    room_order_key,
    worker_heartbeat_key,
    worker_held_key,
    worker_webhooks_key,
)
from avatarq.ledger.sweeps import Orphan, Orphans, OrphanWebhook, Sweeps
from avatarq.ledger.types import Claim
from avatarq.ledger.worker import REJOIN_GRACE_S, Ledger
from avatarq.settings import Settings
from producers.client import cancel, enqueue
from producers.deadletter import list_dead


def run(redis_url: str, body: Callable[[Ledger], Awaitable[Any]], stale: float = 3600) -> Any:
    async def go() -> Any:
        client = aioredis.from_url(redis_url)
        try:
            return await body(Ledger(client, stale_after_s=stale))
        finally:
            await client.aclose()

    return asyncio.run(go())


def room(*queued: str, redis_url: str | None = None) -> str:
    """A fresh room; `queued` job ids take their places in its order, as `enqueue` does."""
    name = f"room-{uuid.uuid4().hex[:8]}"
    if queued:
        assert redis_url
        redis.Redis.from_url(redis_url).rpush(room_order_key(name), *queued)
    return name


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
            assert (
                await ledger.finish(
                    job_id, r, {"job_id": job_id, "status": "completed"}, token=f"t-{job_id}"
                )
            ).recorded
        return order

    assert run(redis_server, body) == ids
    assert redis.Redis.from_url(redis_server).llen(room_order_key(r)) == 0


def test_ended_job_is_never_played_again(redis_server: str) -> None:
    r = room("once", redis_url=redis_server)

    async def body(ledger: Ledger) -> None:
        assert (await ledger.claim("once", r, "t1"))[0] is Claim.OK
        assert (
            await ledger.finish("once", r, {"job_id": "once", "status": "completed"}, token="t1")
        ).recorded
        assert (await ledger.claim("once", r, "t2"))[0] is Claim.DONE
        # A second terminal record never replaces the first.
        assert not (
            await ledger.finish("once", r, {"job_id": "once", "status": "failed"}, token="t2")
        ).recorded

    run(redis_server, body)
    record = json.loads(redis.Redis.from_url(redis_server).get(job_record_key("once")))
    assert record["status"] == "completed"


def test_duplicate_delivery_meets_the_lease(redis_server: str) -> None:
    r = room("dup", redis_url=redis_server)

    async def body(ledger: Ledger) -> None:
        assert (await ledger.claim("dup", r, "worker-1"))[0] is Claim.OK
        assert (await ledger.claim("dup", r, "worker-2"))[0] is Claim.BUSY
        assert await ledger.watch("dup", r, "worker-1") == (False, True)
        # The duplicate's watch learns that the job is not its own (and takes nothing).
        assert await ledger.watch("dup", r, "worker-2") == (False, False)
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
    r = room("p1", redis_url=redis_server)
    settings = Settings(REDIS_URL=redis_server, CELERY_BROKER_URL=redis_server)

    async def start(ledger: Ledger) -> None:
        assert (await ledger.claim("p1", r, "t"))[0] is Claim.OK

    run(redis_server, start)
    assert cancel("p1", settings=settings) == "playing"

    async def check_and_end(ledger: Ledger) -> None:
        assert (await ledger.watch("p1", r, "t"))[0]  # the cancel request
        await ledger.finish("p1", r, {"job_id": "p1", "status": "cancelled"}, token="t")

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
    client.rpush(room_order_key(r), "next")

    async def body(ledger: Ledger) -> None:
        assert (await ledger.claim("next", r, "t"))[0] is Claim.OK

    run(redis_server, body, stale=5)
    assert client.lrange(room_order_key(r), 0, -1) == [b"next"]

    async def young(ledger: Ledger) -> None:
        client.rpush(room_order_key(r + "y"), "queued-recently", "behind")
        client.hset(job_enqueued_key("queued-recently"), mapping={"ts": time.time(), "room": r})
        assert (await ledger.claim("behind", r + "y", "t"))[0] is Claim.WAIT

    run(redis_server, young, stale=5)


def test_playing_job_reasserts_its_room_after_redis_lost_its_data(redis_server: str) -> None:
    # A Redis crash with default persistence forgets the room's order and the lease while a
    # job plays and the next one waits: the next one must not start on top of it.
    r = room()
    client = redis.Redis.from_url(redis_server)
    head, nxt = f"head-{r}", f"next-{r}"
    client.rpush(room_order_key(r), head, nxt)

    async def body(ledger: Ledger) -> None:
        assert (await ledger.claim(head, r, "w1/a"))[0] is Claim.OK
        client.delete(room_order_key(r), job_lease_key(head), room_holder_key(r))
        client.delete(job_enqueued_key(nxt))
        # The waiting job finds no order: it puts itself in, but may not start at once...
        assert (await ledger.claim(nxt, r, "w2/b"))[0] is Claim.WAIT
        # ...and the playing job's next watch tick restores its lease and its place first.
        assert await ledger.watch(head, r, "w1/a") == (False, True)
        assert client.lrange(room_order_key(r), 0, -1) == [head.encode(), nxt.encode()]
        await asyncio.sleep(REJOIN_GRACE_S + 0.1)
        assert (await ledger.claim(nxt, r, "w2/b"))[0] is Claim.WAIT
        assert (
            await ledger.finish(head, r, {"job_id": head, "status": "completed"}, token="w1/a")
        ).recorded
        assert (await ledger.claim(nxt, r, "w2/b"))[0] is Claim.OK

    run(redis_server, body)


def test_no_job_starts_while_another_holds_the_room(redis_server: str) -> None:
    r = room()
    client = redis.Redis.from_url(redis_server)

    async def body(ledger: Ledger) -> None:
        client.rpush(room_order_key(r), f"a-{r}")
        assert (await ledger.claim(f"a-{r}", r, "w1/a"))[0] is Claim.OK
        # The order alone says f"b-{r}" is next (e.g. rebuilt wrongly): the room holder says no.
        client.delete(room_order_key(r))
        client.rpush(room_order_key(r), f"b-{r}")
        assert (await ledger.claim(f"b-{r}", r, "w2/b"))[0] is Claim.WAIT
        assert client.get(room_holder_key(r)) == f"a-{r}".encode()

    run(redis_server, body)


def test_orphans_of_a_dead_worker_are_taken_once(redis_server: str) -> None:
    r = room()
    client = redis.Redis.from_url(redis_server)
    dead, alive = f"dead-{r}", f"alive-{r}"
    payload = json.dumps({"job_id": f"o1-{r}", "room": r})
    client.sadd(WORKERS_KEY, dead, alive)
    client.set(worker_heartbeat_key(alive), "1", px=15_000)
    client.hset(worker_held_key(alive), f"o3-{r}", "{}")
    client.hset(worker_held_key(dead), mapping={f"o1-{r}": payload, f"o2-{r}": "{}"})
    client.set(job_record_key(f"o2-{r}"), "{}")  # ended: nothing to recover

    async def body(ledger: Ledger) -> None:
        client.rpush(room_order_key(r), f"o1-{r}", f"o4-{r}")
        assert (await ledger.claim(f"o1-{r}", r, Ledger.new_token(dead)))[0] is Claim.OK
        # Each worker records the end of a job with a webhook; the live one delivers its own.
        hook = "http://127.0.0.1:9/hook"
        for job, worker in ((f"o2-{r}", dead), (f"o4-{r}", alive)):
            client.delete(job_record_key(job))
            await ledger.finish(job, r, {"job_id": job}, token=Ledger.new_token(worker),
                                hand_on=False, webhook=hook)  # fmt: skip
        await ledger.webhook_delivered(alive, f"o4-{r}")
        owed = OrphanWebhook(f"o2-{r}", hook, json.dumps({"job_id": f"o2-{r}"}))
        assert await Sweeps(ledger).take_orphans(alive) == Orphans(
            [Orphan(f"o1-{r}", payload, playing=True)], [owed]
        )
        assert await Sweeps(ledger).take_orphans(alive) == Orphans([], [])
        # The taker owes it now (if it dies before delivering it, the next sweep takes it).
        assert client.hgetall(worker_webhooks_key(alive)) == {f"o2-{r}".encode(): hook.encode()}
        await ledger.webhook_delivered(alive, f"o2-{r}")
        # The dead worker's lease went with it: the published copy plays at once.
        assert await ledger.claim(f"o1-{r}", r, Ledger.new_token(alive)) == (Claim.OK, 2)

    run(redis_server, body)
    assert not client.sismember(WORKERS_KEY, dead)
    assert client.hgetall(worker_held_key(alive)) == {f"o3-{r}".encode(): b"{}"}
    assert not client.exists(worker_webhooks_key(alive), worker_webhooks_key(dead))


def test_avatar_session_note_lives_until_the_job_ends(redis_server: str) -> None:
    r = room()

    async def body(ledger: Ledger) -> None:
        sweeps = Sweeps(ledger)
        assert await sweeps.avatar_session("av1") is None
        await ledger.note_avatar_session("av1", "http://avatar.test", "sess-1")
        assert await sweeps.avatar_session("av1") == ("http://avatar.test", "sess-1")
        await ledger.note_avatar_session("av1", "http://avatar.test", None)
        assert await sweeps.avatar_session("av1") == ("http://avatar.test", None)
        await ledger.finish("av1", r, {"job_id": "av1", "status": "completed"}, token="t")
        assert await sweeps.avatar_session("av1") is None

    run(redis_server, body)


def test_dead_letter_keeps_the_job_for_the_operator(redis_server: str) -> None:
    settings = Settings(REDIS_URL=redis_server, CELERY_BROKER_URL=redis_server)
    job = {"job_id": "dead-1", "room": room(), "avatar_id": "a", "source": "a.wav"}
    failed = {"job_id": "dead-1", "status": "failed", "reason": "avatar_timeout", "attempt": 5}
    before = time.time()

    async def body(ledger: Ledger) -> None:
        await ledger.dead_letter(job, failed)

    run(redis_server, body)
    (entry, *_) = list_dead(settings=settings)
    assert entry.pop("ts") >= before
    assert entry == {"job": job, **failed}
