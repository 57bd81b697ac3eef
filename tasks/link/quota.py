"""A fleet-wide quota of concurrent sessions per avatar server.

An avatar session is a GPU renderer limited per license, so every worker process takes a
slot in Redis (a lease, like a job's) before start-avatar and gives it back when the session
ends. Slots go first come, first served; a 429 under the quota shrinks it for a while.
How it behaves: docs/guarantees.md (avatar capacity)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeout

from avatarq.ledger.clock import server_ms
from avatarq.ledger.keys import QuotaPart, avatar_quota_key, effective_quota
from avatarq.ledger.scripts import Lua, script
from avatarq.redisclient import COMMAND_TIMEOUT_S, cancel_and_wait
from tasks.backoff import backoff_delay
from tasks.link.types import NoAvatarSlot, Waiting

log = logging.getLogger("avatarq.quota")

#: A slot outlives a few missed renewals; a dead worker's slot comes free this soon.
SLOT_LEASE_S = 15.0
RENEW_EVERY_S = SLOT_LEASE_S / 3
#: A renewal that has not answered in this long failed (a partition may drop packets unseen).
RENEW_TIMEOUT_S = 2.0
#: A slot no renewal has confirmed for all but this long ends its session (`Slot.on_lapse`):
#: another worker may take it once it lapses, and the session must be gone by then.
LAPSE_MARGIN_S = RENEW_EVERY_S
#: A waiting job asks again as soon as a slot is released (a notice on the `freed` channel),
#: and at least this often: a dead worker's slot lapses without a notice.
WAIT_POLL_S = 1.0
#: A waiter that stopped asking this long ago lost its place (its worker died or gave up).
WAITER_STALE_S = 10.0
#: A release-notice connection quiet for this long is pinged.
NOTICE_PING_S = 5.0
#: How long a 429 keeps the quota shrunk.
BACKOFF_WINDOW_S = 60.0

_key = avatar_quota_key


@dataclass
class Slot:
    """One session slot, held until released (or until its lease runs out)."""

    server: str
    holder: str = field(default_factory=lambda: uuid.uuid4().hex)
    #: Called once if renewals fail until the lease is about to run out: its holder ends the
    #: session, so that it is gone before the slot can go to another worker.
    on_lapse: Callable[[], None] | None = field(default=None, repr=False)
    _renewer: asyncio.Task[None] | None = field(default=None, repr=False)


class AvatarQuota:
    """The quota of one avatar server (`quota` sessions), shared through Redis."""

    def __init__(self, redis: aioredis.Redis, server: str, quota: int) -> None:
        self.redis = redis
        self.server = server
        self.quota = max(1, quota)
        self._acquire = script(redis, Lua.SLOTS_ACQUIRE)
        self._renew = script(redis, Lua.SLOTS_RENEW)
        #: Release notices seen by this process; waiters wake on each.
        self.freed_count = 0
        self._freed = asyncio.Condition()
        self._listener: asyncio.Task[None] | None = None

    def _keys(self) -> list[str]:
        parts: tuple[QuotaPart, ...] = ("sessions", "waiting", "waiting-seen", "cap", "limits")
        return [_key(self.server, k) for k in parts]

    async def try_acquire(self, job_id: str) -> Slot | Waiting:
        """A slot if one is free and no earlier job waits for it, else the job's place."""
        slot = Slot(self.server)
        lease_ms, stale_ms = int(SLOT_LEASE_S * 1000), int(WAITER_STALE_S * 1000)
        args: list[str | int] = [slot.holder, job_id, lease_ms, self.quota, stale_ms]
        reply = await self._acquire(keys=self._keys(), args=args)
        if int(reply[0]) == 1:
            return slot
        return Waiting(place=int(reply[1]), sessions=int(reply[2]), quota=int(reply[3]))

    def hold(self, slot: Slot) -> None:
        """Keep renewing `slot` in the background until it is released."""
        slot._renewer = asyncio.get_running_loop().create_task(self._keep(slot))

    async def _keep(self, slot: Slot) -> None:
        confirmed_until = time.monotonic() + SLOT_LEASE_S
        failing = False
        while True:  # until released (cancelled)
            await asyncio.sleep(WAIT_POLL_S if failing else RENEW_EVERY_S)
            asked_at = time.monotonic()
            try:
                renew: list[str | int] = [slot.holder, int(SLOT_LEASE_S * 1000)]
                async with asyncio.timeout(RENEW_TIMEOUT_S):
                    renewed = await self._renew(keys=[_key(self.server, "sessions")], args=renew)
                confirmed_until, failing = asked_at + SLOT_LEASE_S, False
                if not renewed:
                    log.warning("avatar server %r: a held session slot had lapsed; counted again",
                                self.server)  # fmt: skip
            except (RedisError, TimeoutError) as e:
                if not failing:  # once per outage; it is asked again every WAIT_POLL_S
                    log.warning(
                        "avatar server %r: slot not renewed: %s", self.server, e or "timeout"
                    )
                failing = True
                on_lapse = slot.on_lapse
                if on_lapse is not None and confirmed_until - time.monotonic() <= LAPSE_MARGIN_S:
                    slot.on_lapse = None
                    log.warning("avatar server %r: ending a session before its slot lapses",
                                self.server)  # fmt: skip
                    on_lapse()

    async def release(self, slot: Slot) -> None:
        if slot._renewer is not None:
            await cancel_and_wait(slot._renewer)
            slot._renewer = None
        try:
            await self.redis.zrem(_key(self.server, "sessions"), slot.holder)
            await self.redis.publish(_key(self.server, "freed"), slot.holder)
        except RedisError as e:  # the lease runs out by itself
            log.warning("avatar server %r: slot not released: %s", self.server, e)

    async def next_release(self, seen: int, *, timeout: float) -> None:
        """Wait until a release notice after the `seen`-th (`freed_count`), or `timeout`."""
        if self._listener is None or self._listener.done():
            self._listener = asyncio.get_running_loop().create_task(self._listen())
        async with self._freed:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._freed.wait_for(lambda: self.freed_count > seen)

    async def _listen(self) -> None:
        loop = asyncio.get_running_loop()
        for attempt in itertools.count():
            try:
                async with self.redis.pubsub() as pubsub:
                    await pubsub.subscribe(_key(self.server, "freed"))
                    heard = loop.time()
                    while True:
                        # Pinged when quiet: a connection nothing answers any more (Redis
                        # failed over) is let go, where waiting for notices would last for ever.
                        message = await pubsub.get_message(timeout=NOTICE_PING_S)
                        if message is None:
                            if loop.time() - heard > NOTICE_PING_S + COMMAND_TIMEOUT_S:
                                raise RedisTimeout("no answer to the release notices' ping")
                            await pubsub.ping()
                            continue
                        heard = loop.time()
                        if message.get("type") == "message":
                            async with self._freed:
                                self.freed_count += 1
                                self._freed.notify_all()
            except RedisError as e:  # waiters fall back to asking every WAIT_POLL_S
                log.debug("avatar server %r: release notices paused: %s", self.server, e)
            await asyncio.sleep(backoff_delay(min(attempt, 4), 0.5, 5.0))

    async def aclose(self) -> None:
        """Stop listening for release notices (a quota that outlives its Redis client)."""
        if self._listener is not None:
            await cancel_and_wait(self._listener)
            self._listener = None

    async def leave_line(self, job_id: str) -> None:
        """The job stopped waiting (it was cancelled or will be requeued later)."""
        with contextlib.suppress(RedisError):
            await self.redis.zrem(_key(self.server, "waiting"), job_id)

    async def shrink(self) -> int:
        """The server refused a session under the quota: cap the quota at what is held now
        (one less than that, counting the refused one, never below one) for a while."""
        sessions = _key(self.server, "sessions")
        await self.redis.zremrangebyscore(sessions, "-inf", await server_ms(self.redis))
        cap = max(1, int(await self.redis.zcard(sessions)))
        await self.redis.set(_key(self.server, "cap"), cap, ex=int(BACKOFF_WINDOW_S))
        log.warning("avatar server %r refused a session: quota %d for a while", self.server, cap)
        return cap

    async def demand(self) -> int:
        """Jobs waiting for a slot of this server now."""
        return int(await self.redis.zcard(_key(self.server, "waiting")))

    async def snapshot(self) -> dict[str, Any]:
        """Sessions held, effective quota and waiting jobs (for status and metrics)."""
        now = await server_ms(self.redis)
        pipe = self.redis.pipeline(transaction=False)
        pipe.zcount(_key(self.server, "sessions"), now, "+inf")
        pipe.get(_key(self.server, "cap"))
        pipe.zrangebyscore(_key(self.server, "limits"), now, "+inf")
        pipe.zcard(_key(self.server, "waiting"))
        sessions, cap, limits, waiting = await pipe.execute()
        quota = effective_quota(self.quota, cap, limits)
        return {"server": self.server, "sessions": sessions, "quota": quota, "waiting": waiting}


async def wait_for_slot(
    quota: AvatarQuota,
    job_id: str,
    *,
    patience_s: float,
    on_wait: Any = None,
    stop: asyncio.Event | None = None,
) -> Slot:
    """A slot within `patience_s`, else `NoAvatarSlot` (the job goes back to the queue, its
    place in line kept a while); at once when `stop` is set (it leaves the line). It asks
    again on each release notice. `on_wait(Waiting)` is awaited when the wait starts and
    whenever the job's place changes."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + patience_s
    seen: Waiting | None = None
    for _ in range(int(patience_s * 1000)):  # bound: at most one ask per millisecond waited
        notices = quota.freed_count
        got = await quota.try_acquire(job_id)
        if isinstance(got, Slot):
            return got
        if on_wait is not None and (seen is None or got.place != seen.place):
            await on_wait(got)
        seen = got
        left = deadline - loop.time()
        if stop is not None and stop.is_set():
            await quota.leave_line(job_id)
            raise NoAvatarSlot(quota.server, got)
        if left <= 0:
            raise NoAvatarSlot(quota.server, got)
        await _first(quota.next_release(notices, timeout=min(WAIT_POLL_S, left)), stop)
    raise NoAvatarSlot(quota.server, seen or Waiting(place=0, sessions=0, quota=quota.quota))


async def _first(wait: Coroutine[Any, Any, None], stop: asyncio.Event | None) -> None:
    """`wait`, cut short when `stop` is set."""
    if stop is None:
        await wait
        return
    waiting = asyncio.ensure_future(wait)
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({waiting, stopped}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (waiting, stopped):
            task.cancel()
