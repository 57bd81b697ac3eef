"""The producers' side of the ledger (sync, light: no worker code): register a job at enqueue,
request a cancel, read what a job is doing, the avatar servers' capacity and the rooms'
orders, and the operator's side of the dead-letter list (`avatarq dead list|retry|purge`)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import redis

from avatarq.events import Event
from avatarq.ledger.clock import server_ms_sync
from avatarq.ledger.keys import (
    DEAD_LETTER_KEY,
    RECORD_TTL_S,
    UNSEEN_KEY,
    avatar_quota_key,
    effective_quota,
    job_attempts_key,
    job_cancel_key,
    job_enqueued_key,
    job_events_key,
    job_lease_key,
    job_record_key,
    job_waiting_key,
    room_order_key,
)
from avatarq.ledger.scripts import Lua, script

T = TypeVar("T")


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


@dataclass(frozen=True)
class JobMarks:
    """What the ledger holds of a job that has not ended."""

    #: {server, place, sessions, quota} while it waits for a session of its avatar server.
    waiting: dict[str, Any] | None
    #: A live lease: a worker plays it now (Celery's state outlives a killed worker).
    leased: bool
    #: Registered by `enqueue` (and not yet expired).
    enqueued: bool
    cancel_requested: bool
    #: The data of its `job.progress` event when that is its latest event: fresher than
    #: Celery's PROGRESS state, which the worker writes less often (tasks/report.py).
    progress: dict[str, Any] | None = None


class ProducerLedger:
    """The ledger over one deployment's Redis (`redis`, replies as bytes)."""

    def __init__(self, redis: redis.Redis) -> None:
        # redis-py types every reply as `Any` or an awaitable; these are sync replies.
        self.redis: Any = redis
        self._register = script(redis, Lua.REGISTER)

    def register(self, job_id: str, room: str, payload: Mapping[str, Any]) -> bool:
        """Register the job once per id and give it its place in its room's order; False
        when the id was registered before (then nothing must be sent)."""
        keys = [job_enqueued_key(job_id), room_order_key(room), UNSEEN_KEY]
        args: list[str | int] = [
            f"{time.time():.3f}",
            room,
            json.dumps(payload),
            RECORD_TTL_S,
            job_id,
        ]
        return bool(self._register(keys=keys, args=args))

    def unregister(self, job_id: str, room: str) -> None:
        """The job could not be sent: free its id and its room's place for another try."""
        self.redis.lrem(room_order_key(room), 0, job_id)
        self.redis.zrem(UNSEEN_KEY, job_id)
        self.redis.delete(job_enqueued_key(job_id))

    def record(self, job_id: str) -> dict[str, Any] | None:
        """The job's terminal record, once it ended."""
        raw = self.redis.get(job_record_key(job_id))
        return json.loads(raw) if raw is not None else None

    def marks(self, job_id: str) -> JobMarks:
        pipe = self.redis.pipeline(transaction=False)
        pipe.get(job_waiting_key(job_id))
        pipe.exists(job_lease_key(job_id))
        pipe.exists(job_enqueued_key(job_id))
        pipe.exists(job_cancel_key(job_id))
        pipe.xrevrange(job_events_key(job_id), count=1)
        waiting, leased, enqueued, cancel, latest = pipe.execute()
        fields = latest[0][1] if latest else {}
        return JobMarks(
            waiting=json.loads(waiting) if waiting is not None else None,
            leased=bool(leased),
            enqueued=bool(enqueued),
            cancel_requested=bool(cancel),
            progress=json.loads(fields[b"data"])
            if fields.get(b"event") == Event.PROGRESS.value.encode()
            else None,
        )

    def leased(self, job_id: str) -> bool:
        return bool(self.redis.exists(job_lease_key(job_id)))

    def enqueued_job(self, job_id: str) -> dict[str, Any] | None:
        """The payload the job was enqueued with."""
        raw = self.redis.hget(job_enqueued_key(job_id), "job")
        return json.loads(raw) if raw else None

    def request_cancel(self, job_id: str) -> Literal["queued", "playing", "ended"]:
        """Ask the job to stop (workers watch for it); what it was doing then, "ended" when
        it is too late and nothing changed."""
        if self.redis.exists(job_record_key(job_id)):
            return "ended"
        self.redis.set(job_cancel_key(job_id), "1", ex=RECORD_TTL_S)
        return "playing" if self.leased(job_id) else "queued"

    def capacity(self, quotas: Mapping[str, int]) -> list[dict[str, Any]]:
        """Per avatar server (name → configured quota), by name: sessions held across the
        fleet, the effective quota (the smallest a live worker keeps to, shrunk for a while
        after a 429) and waiting jobs."""
        now_ms = server_ms_sync(self.redis)
        rows = []
        for name, quota in sorted(quotas.items()):
            cap = self.redis.get(avatar_quota_key(name, "cap"))
            limits = self.redis.zrangebyscore(avatar_quota_key(name, "limits"), now_ms, "+inf")
            sessions = self.redis.zcount(avatar_quota_key(name, "sessions"), now_ms, "+inf")
            rows.append(
                {
                    "server": name,
                    "sessions": int(sessions),
                    "quota": effective_quota(quota, cap, limits),
                    "waiting": int(self.redis.zcard(avatar_quota_key(name, "waiting"))),
                }
            )
        return rows

    def rooms(self, limit: int) -> list[str]:
        """Up to `limit` rooms with unfinished jobs, in no particular order."""
        prefix = room_order_key("")
        found: list[str] = []
        for key in self.redis.scan_iter(match=room_order_key("*"), count=500):
            found.append(_text(key)[len(prefix) :])
            if len(found) == limit:
                break
        return found

    def room_order(self, room: str, limit: int) -> list[str]:
        """The first `limit` unfinished jobs of `room`, in play order (the head plays first)."""
        return [_text(i) for i in self.redis.lrange(room_order_key(room), 0, limit - 1)]

    def dead_letters(self, limit: int) -> list[dict[str, Any]]:
        """Jobs whose retries ran out (job, reason, error, attempt, ts), newest first."""
        return [json.loads(raw) for raw in self.redis.lrange(DEAD_LETTER_KEY, 0, limit - 1)]

    def replay_dead(self, job_id: str, send: Callable[[dict[str, Any]], T]) -> T:
        """Forget that the dead-lettered job ever ran, `send` its payload again, and only then
        take it off the list (a failed send leaves it there). KeyError when it is not there."""
        raw = self._find_dead(job_id)
        if raw is None:
            raise KeyError(f"job {job_id} is not in the dead-letter list")
        # Its failed record would make workers skip it: this is a deliberate replay.
        self.redis.delete(
            job_record_key(job_id),
            job_enqueued_key(job_id),
            job_attempts_key(job_id),
            job_cancel_key(job_id),
        )
        sent = send(json.loads(raw)["job"])
        self.redis.lrem(DEAD_LETTER_KEY, 0, raw)
        return sent

    def purge_dead(self, job_id: str | None = None) -> int:
        """Drop one dead-lettered job, or all of them; how many were dropped."""
        if job_id is None:
            count = int(self.redis.llen(DEAD_LETTER_KEY))
            self.redis.delete(DEAD_LETTER_KEY)
            return count
        raw = self._find_dead(job_id)
        return int(self.redis.lrem(DEAD_LETTER_KEY, 0, raw)) if raw is not None else 0

    def _find_dead(self, job_id: str) -> bytes | None:
        for raw in self.redis.lrange(DEAD_LETTER_KEY, 0, -1):
            if json.loads(raw)["job_id"] == job_id:
                return raw  # type: ignore[no-any-return]
        return None
