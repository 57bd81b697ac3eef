"""Who may play a job, and when: the Redis records behind the delivery guarantees.

- A job id with a terminal record is never played again (exactly-once playback on top of
  Celery's at-least-once delivery).
- A job is played under a lease that the worker renews; a duplicate delivery meets the lease
  and is dropped, a dead worker's lease expires so the redelivered message can play.
- Each room has a FIFO of unfinished job ids; only its head may play, so two jobs for one room
  never overlap and play in enqueue order, whatever the number of workers. The playing job
  also holds the room (`room_holder_key`), and re-asserts its lease, its hold on the room and
  its place at the head of the order on every watch tick, so a Redis that lost its data (a
  crash with default persistence) gets them back before a waiting job could start.
- Each worker process announces itself and the deliveries it holds (tasks/recovery.py); once
  its heartbeat is gone, `take_orphans` hands those deliveries to one live worker, which
  publishes them again: recovery within seconds instead of the broker's visibility timeout.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import redis.asyncio as aioredis

from avatarq.events import (
    DEAD_LETTER_KEY,
    RECORD_TTL_S,
    WORKERS_KEY,
    job_attempts_key,
    job_avatar_key,
    job_cancel_key,
    job_enqueued_key,
    job_lease_key,
    job_record_key,
    room_holder_key,
    room_order_key,
    worker_heartbeat_key,
    worker_held_key,
)

log = logging.getLogger("avatarq.ledger")

#: A lease outlives a few missed renewals, yet a dead worker's job is free again soon.
LEASE_TTL_S = 15.0
#: A job that had to put itself into its room's order (its place was lost with Redis's data,
#: or it was sent without `enqueue`) waits this long before it may start: the room's playing
#: job re-asserts its place on its next watch tick (every 0.25 s), well within it.
REJOIN_GRACE_S = 1.5
#: How long an avatar session's note is kept if its job never ends (the job's record keeps
#: nothing of it; a finished job drops the note).
AVATAR_NOTE_TTL_S = 24 * 3600

# KEYS: record, cancel, lease, room order, attempts, enqueued, room holder
# ARGV: lease token, lease ttl ms, job id, now, record ttl s, rejoin grace s
_CLAIM = """
if redis.call('EXISTS', KEYS[1]) == 1 then return {'done', 0} end
if redis.call('EXISTS', KEYS[2]) == 1 then return {'cancelled', 0} end
local holder = redis.call('GET', KEYS[3])
if holder and holder ~= ARGV[1] then return {'busy', 0} end
redis.call('HSETNX', KEYS[6], 'ts', ARGV[4])
redis.call('HSET', KEYS[6], 'seen', ARGV[4])
redis.call('EXPIRE', KEYS[6], ARGV[5])
if not redis.call('LPOS', KEYS[4], ARGV[3]) then
  redis.call('RPUSH', KEYS[4], ARGV[3])
  redis.call('HSET', KEYS[6], 'rejoined', ARGV[4])
  return {'wait', 0}
end
if redis.call('LINDEX', KEYS[4], 0) ~= ARGV[3] then return {'wait', 0} end
local rejoined = redis.call('HGET', KEYS[6], 'rejoined')
if rejoined and tonumber(ARGV[4]) - tonumber(rejoined) < tonumber(ARGV[6]) then
  return {'wait', 0}
end
local playing = redis.call('GET', KEYS[7])
if playing and playing ~= ARGV[3] then return {'wait', 0} end
redis.call('SET', KEYS[3], ARGV[1], 'PX', ARGV[2])
redis.call('SET', KEYS[7], ARGV[3], 'PX', ARGV[2])
local n = redis.call('INCR', KEYS[5])
redis.call('EXPIRE', KEYS[5], ARGV[5])
return {'ok', n}
"""

# One watch tick of a playing job: is a cancel requested, and is the job still ours? Renews
# the lease and the room, and puts them back if Redis lost them.
# KEYS: lease, cancel, record, room order, room holder; ARGV: token, ttl ms, job id
_WATCH = """
local cancel = redis.call('EXISTS', KEYS[2])
local holder = redis.call('GET', KEYS[1])
if (holder and holder ~= ARGV[1]) or redis.call('EXISTS', KEYS[3]) == 1 then
  return {cancel, 0}
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
local playing = redis.call('GET', KEYS[5])
if not playing or playing == ARGV[3] then
  redis.call('SET', KEYS[5], ARGV[3], 'PX', ARGV[2])
end
if redis.call('LINDEX', KEYS[4], 0) ~= ARGV[3] then
  redis.call('LREM', KEYS[4], 0, ARGV[3])
  redis.call('LPUSH', KEYS[4], ARGV[3])
end
return {cancel, 1}
"""

# KEYS: lease, room holder, attempts; ARGV: token, job id, 1 to take the attempt back
_RELEASE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
if redis.call('GET', KEYS[2]) == ARGV[2] then redis.call('DEL', KEYS[2]) end
if ARGV[3] == '1' then redis.call('DECR', KEYS[3]) end
return 1
"""

# KEYS: record, room order, lease, room holder, avatar note; ARGV: record json, job id, ttl s
_FINISH = """
redis.call('LREM', KEYS[2], 0, ARGV[2])
if redis.call('GET', KEYS[4]) == ARGV[2] then redis.call('DEL', KEYS[4]) end
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[3]) then
  redis.call('DEL', KEYS[3], KEYS[5])
  return 1
end
return 0
"""

# Deliveries held by worker processes whose heartbeat is gone, taken (and so recovered) by
# exactly one caller, each with whether it was playing (held the lease). A dead worker's
# leases go with it; jobs that ended are left out.
# KEYS: workers set; ARGV: heartbeat, held, lease and record key prefixes
_TAKE_ORPHANS = """
local out = {}
for _, w in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if redis.call('EXISTS', ARGV[1] .. w) == 0 then
    local items = redis.call('HGETALL', ARGV[2] .. w)
    for i = 1, #items, 2 do
      local job = items[i]
      local lease = ARGV[3] .. job
      local holder = redis.call('GET', lease)
      local playing = 0
      if holder and string.sub(holder, 1, #w + 1) == w .. '/' then
        redis.call('DEL', lease)
        playing = 1
      end
      if redis.call('EXISTS', ARGV[4] .. job) == 0 then
        table.insert(out, job)
        table.insert(out, items[i + 1])
        table.insert(out, playing)
      end
    end
    redis.call('DEL', ARGV[2] .. w)
    redis.call('SREM', KEYS[1], w)
  end
end
return out
"""


@dataclass(frozen=True)
class Orphan:
    """A delivery its dead worker held."""

    #: Its Celery task id: the job id, unless the message named another job's id.
    task_id: str
    payload: str
    #: It held the job's lease: its avatar may still be in the room.
    playing: bool


class Claim(StrEnum):
    OK = "ok"  # play it now
    DONE = "done"  # already ended: never play again
    CANCELLED = "cancelled"  # cancelled before it started
    BUSY = "busy"  # another worker is playing this very job: a duplicate delivery
    WAIT = "wait"  # an earlier job of the same room has not ended yet


class Ledger:
    def __init__(self, redis: aioredis.Redis, *, stale_after_s: float) -> None:
        self.redis = redis
        self.stale_after_s = stale_after_s
        self._claim = redis.register_script(_CLAIM)
        self._watch = redis.register_script(_WATCH)
        self._release = redis.register_script(_RELEASE)
        self._finish = redis.register_script(_FINISH)
        self._take_orphans = redis.register_script(_TAKE_ORPHANS)

    @staticmethod
    def new_token(worker_id: str) -> str:
        """A lease token for one delivery; it names its worker process, so the lease can be
        freed as soon as that process is known dead."""
        return f"{worker_id}/{uuid.uuid4().hex}"

    async def claim(self, job_id: str, room: str, token: str) -> tuple[Claim, int]:
        """Try to start playing; returns the verdict and, when OK, the attempt number."""
        await self._drop_finished_heads(job_id, room)
        keys = [
            job_record_key(job_id),
            job_cancel_key(job_id),
            job_lease_key(job_id),
            room_order_key(room),
            job_attempts_key(job_id),
            job_enqueued_key(job_id),
            room_holder_key(room),
        ]
        args: list[str | int | float] = [
            token,
            int(LEASE_TTL_S * 1000),
            job_id,
            f"{time.time():.3f}",
            RECORD_TTL_S,
            REJOIN_GRACE_S,
        ]
        verdict, attempt = await self._claim(keys=keys, args=args)
        return Claim(verdict.decode() if isinstance(verdict, bytes) else verdict), int(attempt)

    async def _drop_finished_heads(self, job_id: str, room: str, limit: int = 100) -> None:
        """Unblock the room from heads that ended, or were lost without ending."""
        order = room_order_key(room)
        for _ in range(limit):
            head: bytes | None = await self.redis.lindex(order, 0)  # type: ignore[assignment]
            if head is None or head.decode() == job_id:
                return
            head_id = head.decode()
            if not await self._is_finished_or_lost(head_id):
                return
            await self.redis.lrem(order, 1, head_id)

    async def _is_finished_or_lost(self, job_id: str) -> bool:
        if await self.redis.exists(job_record_key(job_id)):
            return True
        if await self.redis.exists(job_lease_key(job_id)):
            return False
        # Not playing and untouched for longer than the broker's redelivery window: its message
        # is gone (e.g. a broker that lost its data), so it must not block the room forever.
        seen = await self.redis.hmget(job_enqueued_key(job_id), ["ts", "seen"])
        stamps = [float(s) for s in seen if s is not None]
        if stamps and time.time() - max(stamps) > self.stale_after_s:
            log.warning("dropping job %s from its room's order: lost (never ended)", job_id)
            return True
        return False

    async def watch(self, job_id: str, room: str, token: str) -> tuple[bool, bool]:
        """One tick of a playing job: (cancel requested, the job is still ours). Renews the
        lease and the hold on the room, restoring them (and the job's place at the head of
        the room's order) if Redis lost them."""
        keys = [
            job_lease_key(job_id),
            job_cancel_key(job_id),
            job_record_key(job_id),
            room_order_key(room),
            room_holder_key(room),
        ]
        cancel, ours = await self._watch(keys=keys, args=[token, int(LEASE_TTL_S * 1000), job_id])
        return bool(cancel), bool(ours)

    async def release(self, job_id: str, room: str, token: str, *, uncount: bool = False) -> None:
        """Give the job back without ending it (it will be played again from the start).
        `uncount`: this claim was no attempt at all (it only waited), so it does not count
        against the job's retries."""
        await self._release(
            keys=[job_lease_key(job_id), room_holder_key(room), job_attempts_key(job_id)],
            args=[token, job_id, int(uncount)],
        )

    async def note_avatar_session(self, job_id: str, server: str, session_id: str | None) -> None:
        """Remember the avatar session the job started (call right after start-avatar, and
        when a job takes over a warm session), so that if the job's worker dies, recovery
        stops it instead of leaving it running. `server` is the configured server's name."""
        key = job_avatar_key(job_id)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(key, mapping={"server": server, "session_id": session_id or ""})
            pipe.expire(key, AVATAR_NOTE_TTL_S)
            await pipe.execute()

    async def avatar_session(self, job_id: str) -> tuple[str, str | None] | None:
        """The (server, session id) noted for the job, if any."""
        note: dict[bytes, bytes] = await self.redis.hgetall(job_avatar_key(job_id))  # type: ignore[assignment,misc]
        if b"server" not in note:
            return None
        return note[b"server"].decode(), note.get(b"session_id", b"").decode() or None

    async def forget_avatar_session(self, job_id: str) -> None:
        await self.redis.delete(job_avatar_key(job_id))

    async def take_orphans(self) -> list[Orphan]:
        """Every unfinished delivery held by a worker process whose heartbeat is gone; each
        is returned to one caller only, which must publish it again."""
        prefixes = [worker_heartbeat_key(""), worker_held_key(""), job_lease_key(""),
                    job_record_key("")]  # fmt: skip
        flat: list[Any] = await self._take_orphans(keys=[WORKERS_KEY], args=prefixes)
        return [
            Orphan(flat[i].decode(), flat[i + 1].decode(), bool(flat[i + 2]))
            for i in range(0, len(flat), 3)
        ]

    async def owned_by_another(self, job_id: str, payload: Any) -> bool:
        """Whether a valid job owns this id (enqueued with another payload, or claimed by a
        valid delivery): a message that fails validation must not end a job it does not own."""
        registered = await self.redis.hget(job_enqueued_key(job_id), "job")  # type: ignore[misc]
        if registered is not None:
            return bool(json.loads(registered) != payload)
        return bool(await self.redis.exists(job_enqueued_key(job_id)))

    async def dead_letter(self, job: dict[str, Any], result: dict[str, Any]) -> None:
        """Keep a job whose retries ran out where an operator can see and replay it."""
        entry = {"job": job, **result, "ts": time.time()}
        await self.redis.lpush(DEAD_LETTER_KEY, json.dumps(entry))

    async def finish(self, job_id: str, room: str | None, result: dict[str, Any]) -> bool:
        """Record the terminal state once; False if the job had already ended."""
        keys = [
            job_record_key(job_id),
            room_order_key(room or ""),
            job_lease_key(job_id),
            room_holder_key(room or ""),
            job_avatar_key(job_id),
        ]
        done = await self._finish(
            keys=keys, args=[json.dumps(result, default=str), job_id, RECORD_TTL_S]
        )
        return bool(done)
