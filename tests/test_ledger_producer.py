"""The producers' side of the ledger (avatarq/ledger/producer.py) against a real Redis:
registration at enqueue, cancel requests, status marks, avatar capacity, rooms' orders and
the dead-letter list; and scripts registered once per client."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from avatarq.ledger.keys import (
    DEAD_LETTER_KEY,
    avatar_quota_key,
    job_attempts_key,
    job_cancel_key,
    job_enqueued_key,
    job_events_key,
    job_lease_key,
    job_record_key,
    job_waiting_key,
    room_order_key,
)
from avatarq.ledger.producer import JobMarks, ProducerLedger
from avatarq.ledger.scripts import Lua, script, source
from tests.producing import own_db


@pytest.fixture
def r(redis_server: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(own_db(redis_server, 11))
    yield client
    client.close()


@pytest.fixture
def ledger(r: redis.Redis) -> ProducerLedger:
    return ProducerLedger(r)


def test_register_once_per_id_in_room_order(r: redis.Redis, ledger: ProducerLedger) -> None:
    payload = {"job_id": "j1", "room": "hall"}
    assert ledger.register("j1", "hall", payload)
    assert not ledger.register("j1", "hall", {"job_id": "j1", "room": "other"})
    assert ledger.register("j2", "hall", {"job_id": "j2"})
    assert r.lrange(room_order_key("hall"), 0, -1) == [b"j1", b"j2"]
    assert ledger.enqueued_job("j1") == payload  # the first registration's
    assert 0 < r.ttl(job_enqueued_key("j1")) <= 30 * 24 * 3600
    ledger.unregister("j1", "hall")
    assert ledger.room_order("hall", 10) == ["j2"]
    assert ledger.enqueued_job("j1") is None
    assert ledger.register("j1", "hall", payload)  # free again after a failed send


def test_cancel_says_what_the_job_was_doing(r: redis.Redis, ledger: ProducerLedger) -> None:
    assert ledger.request_cancel("queued-1") == "queued"
    r.set(job_lease_key("playing-1"), "w/t")
    assert ledger.request_cancel("playing-1") == "playing"
    r.set(job_record_key("ended-1"), json.dumps({"job_id": "ended-1"}))
    assert ledger.request_cancel("ended-1") == "ended"
    assert r.exists(job_cancel_key("queued-1"), job_cancel_key("playing-1")) == 2
    assert not r.exists(job_cancel_key("ended-1"))  # too late: nothing changes


def test_record_and_marks(r: redis.Redis, ledger: ProducerLedger) -> None:
    assert ledger.record("m1") is None
    nothing = JobMarks(None, leased=False, enqueued=False, cancel_requested=False)
    assert ledger.marks("m1") == nothing
    ledger.register("m1", "hall", {"job_id": "m1"})
    waiting = {"server": "default", "place": 2, "sessions": 3, "quota": 3}
    r.set(job_waiting_key("m1"), json.dumps(waiting))
    r.set(job_lease_key("m1"), "w/t")
    ledger.request_cancel("m1")
    assert ledger.marks("m1") == JobMarks(
        waiting, leased=True, enqueued=True, cancel_requested=True
    )
    assert ledger.leased("m1")
    r.set(job_record_key("m1"), json.dumps({"job_id": "m1", "status": "completed"}))
    assert ledger.record("m1") == {"job_id": "m1", "status": "completed"}


def test_marks_carry_the_progress_of_the_latest_event(
    r: redis.Redis, ledger: ProducerLedger
) -> None:
    def event(name: str, **data: Any) -> None:
        r.xadd(job_events_key("p1"), {"event": name, "job_id": "p1", "data": json.dumps(data)})

    assert ledger.marks("p1").progress is None
    event("job.progress", seconds_streamed=1.2, total_seconds=6.0)
    event("job.progress", seconds_streamed=2.4, total_seconds=6.0)
    assert ledger.marks("p1").progress == {"seconds_streamed": 2.4, "total_seconds": 6.0}
    event("job.retrying", attempt=2)  # a new attempt has not streamed yet
    assert ledger.marks("p1").progress is None


def test_capacity_counts_live_sessions_the_cap_and_waiters(
    r: redis.Redis, ledger: ProducerLedger
) -> None:
    now_ms = int(time.time() * 1000)
    r.zadd(avatar_quota_key("eu", "sessions"), {"a": now_ms + 60_000, "b": now_ms - 1})
    r.zadd(avatar_quota_key("eu", "waiting"), {"w1": now_ms, "w2": now_ms})
    r.set(avatar_quota_key("eu", "cap"), 2)
    assert ledger.capacity({"eu": 5, "default": 10}) == [
        {"server": "default", "sessions": 0, "quota": 10, "waiting": 0},
        {"server": "eu", "sessions": 1, "quota": 2, "waiting": 2},
    ]
    r.set(avatar_quota_key("eu", "cap"), 9)  # a cap never raises the configured quota
    assert ledger.capacity({"eu": 5})[0]["quota"] == 5


def test_rooms_and_their_orders(ledger: ProducerLedger) -> None:
    for i, room in enumerate(["r1", "r1", "r2", "r3"]):
        ledger.register(f"o{i}", room, {})
    assert sorted(ledger.rooms(10)) == ["r1", "r2", "r3"]
    assert len(ledger.rooms(2)) == 2
    assert ledger.room_order("r1", 10) == ["o0", "o1"]
    assert ledger.room_order("r1", 1) == ["o0"]


def _dead(r: redis.Redis, job_id: str) -> dict[str, Any]:
    job = {"job_id": job_id, "room": "dl", "avatar_id": "a", "source": "s3://b/k.wav"}
    entry = {"job": job, "job_id": job_id, "status": "failed", "reason": "x", "ts": 1.0}
    r.lpush(DEAD_LETTER_KEY, json.dumps(entry))
    # As a worker leaves it: record, enqueue marker, attempts, perhaps a cancel request.
    r.set(job_record_key(job_id), "{}")
    r.hset(job_enqueued_key(job_id), "ts", "1")
    r.set(job_attempts_key(job_id), 5)
    r.set(job_cancel_key(job_id), "1")
    return entry


def test_dead_letters_replay_and_purge(r: redis.Redis, ledger: ProducerLedger) -> None:
    entries = [_dead(r, f"d{i}") for i in range(3)]
    assert ledger.dead_letters(10) == entries[::-1]
    assert ledger.dead_letters(1) == [entries[2]]

    sent: list[dict[str, Any]] = []

    def send(job: dict[str, Any]) -> str:
        sent.append(job)
        return "handle"

    assert ledger.replay_dead("d1", send) == "handle"
    assert sent == [entries[1]["job"]]
    keys = (job_record_key, job_enqueued_key, job_attempts_key, job_cancel_key)
    assert not r.exists(*(k("d1") for k in keys))  # workers would skip it, or stop it
    assert [e["job_id"] for e in ledger.dead_letters(10)] == ["d2", "d0"]

    def broken(job: dict[str, Any]) -> None:
        raise ConnectionError("broker down")

    with pytest.raises(ConnectionError):
        ledger.replay_dead("d2", broken)
    assert [e["job_id"] for e in ledger.dead_letters(10)] == ["d2", "d0"]  # kept for a retry
    with pytest.raises(KeyError, match="job d9 is not in the dead-letter list"):
        ledger.replay_dead("d9", sent.append)

    assert ledger.purge_dead("d9") == 0
    assert ledger.purge_dead("d0") == 1
    assert ledger.purge_dead() == 1
    assert ledger.dead_letters(10) == []


def test_scripts_are_files_registered_once_per_client(r: redis.Redis) -> None:
    assert all(source(lua).strip() for lua in Lua)
    assert script(r, Lua.REGISTER) is script(r, Lua.REGISTER)
    other = redis.Redis(connection_pool=r.connection_pool)
    assert script(other, Lua.REGISTER) is not script(r, Lua.REGISTER)
