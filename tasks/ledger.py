"""Who may play a job, and when: the Redis records behind the delivery guarantees.

- A job id with a terminal record is never played again (exactly-once playback on top of
  Celery's at-least-once delivery).
- A job is played under a lease that the worker renews; a duplicate delivery meets the lease
  and is dropped, a dead worker's lease expires so the redelivered message can play.
- Each room has a FIFO of unfinished job ids; only its head may play, so two jobs for one room
  never overlap and play in enqueue order, whatever the number of workers.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from enum import StrEnum
from typing import Any

import redis.asyncio as aioredis

from avatarq.events import (
    RECORD_TTL_S,
    job_attempts_key,
    job_cancel_key,
    job_enqueued_key,
    job_lease_key,
    job_record_key,
    room_order_key,
)

log = logging.getLogger("avatarq.ledger")

#: A lease outlives a few missed renewals, yet a dead worker's job is free again soon.
LEASE_TTL_S = 15.0

# KEYS: record, cancel, lease, room order, attempts, enqueued
# ARGV: lease token, lease ttl ms, job id, now, record ttl s
_CLAIM = """
if redis.call('EXISTS', KEYS[1]) == 1 then return {'done', 0} end
if redis.call('EXISTS', KEYS[2]) == 1 then return {'cancelled', 0} end
local holder = redis.call('GET', KEYS[3])
if holder and holder ~= ARGV[1] then return {'busy', 0} end
redis.call('HSETNX', KEYS[6], 'ts', ARGV[4])
redis.call('HSET', KEYS[6], 'seen', ARGV[4])
redis.call('EXPIRE', KEYS[6], ARGV[5])
if not redis.call('LPOS', KEYS[4], ARGV[3]) then redis.call('RPUSH', KEYS[4], ARGV[3]) end
if redis.call('LINDEX', KEYS[4], 0) ~= ARGV[3] then return {'wait', 0} end
redis.call('SET', KEYS[3], ARGV[1], 'PX', ARGV[2])
local n = redis.call('INCR', KEYS[5])
redis.call('EXPIRE', KEYS[5], ARGV[5])
return {'ok', n}
"""

# KEYS: lease; ARGV: token, ttl ms
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""

# KEYS: record, room order, lease; ARGV: record json, job id, record ttl s
_FINISH = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[3]) then
  redis.call('LREM', KEYS[2], 0, ARGV[2])
  redis.call('DEL', KEYS[3])
  return 1
end
redis.call('LREM', KEYS[2], 0, ARGV[2])
return 0
"""


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
        self._renew = redis.register_script(_RENEW)
        self._finish = redis.register_script(_FINISH)

    @staticmethod
    def new_token() -> str:
        return uuid.uuid4().hex

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
        ]
        args: list[str | int] = [
            token,
            int(LEASE_TTL_S * 1000),
            job_id,
            f"{time.time():.3f}",
            RECORD_TTL_S,
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

    async def renew(self, job_id: str, token: str) -> bool:
        return bool(
            await self._renew(keys=[job_lease_key(job_id)], args=[token, int(LEASE_TTL_S * 1000)])
        )

    async def cancel_requested(self, job_id: str) -> bool:
        return bool(await self.redis.exists(job_cancel_key(job_id)))

    async def release(self, job_id: str, token: str, *, uncount: bool = False) -> None:
        """Give the job back without ending it (it will be played again from the start).
        `uncount`: this claim was no attempt at all (it only waited), so it does not count
        against the job's retries."""
        if await self.redis.get(job_lease_key(job_id)) == token.encode():
            await self.redis.delete(job_lease_key(job_id))
            if uncount:
                await self.redis.decr(job_attempts_key(job_id))

    async def finish(self, job_id: str, room: str | None, result: dict[str, Any]) -> bool:
        """Record the terminal state once; False if the job had already ended."""
        keys = [job_record_key(job_id), room_order_key(room or ""), job_lease_key(job_id)]
        done = await self._finish(
            keys=keys, args=[json.dumps(result, default=str), job_id, RECORD_TTL_S]
        )
        return bool(done)
