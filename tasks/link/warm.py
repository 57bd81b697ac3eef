"""Warm avatars: a room connection and its avatar session, kept between back-to-back jobs.

The next job of the same room and avatar on this process within `AVATARQ_WARM_IDLE` plays as
a new segment on the same session. The avatar's identity is fixed, so a process that must
start cold first asks the holder of an idle session to let it go (a Redis marker per room)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from avatarq.ledger.keys import WARM_RELEASE_TTL_S, warm_holder_key, warm_release_key
from avatarq.ledger.worker import next_job_at_hand
from tasks.link.link import AvatarLink
from tasks.link.types import LinkKey

log = logging.getLogger("avatarq.warm")

#: How often a process holding idle sessions checks for release requests.
RELEASE_POLL_S = 0.2
#: How long a cold start waits for another process to let its idle session go (a holder that
#: died meanwhile never answers: its marker outlives it by its idle window).
RELEASE_WAIT_S = 3.0


def _holder_key(key: LinkKey) -> str:
    return warm_holder_key(key.room, key.avatar_identity)


def _release_key(key: LinkKey) -> str:
    return warm_release_key(key.room, key.avatar_identity)


class WarmPool:
    """Idle links of this worker process, each closed after its idle window or on request."""

    def __init__(self, redis: aioredis.Redis, *, lanes: bool = True) -> None:
        self._redis = redis
        self._lanes = lanes
        self._token = uuid.uuid4().hex
        self._idle: dict[LinkKey, tuple[AvatarLink, asyncio.TimerHandle]] = {}
        self._watcher: asyncio.Task[None] | None = None
        #: Links closing in the background, by key.
        self._closing: dict[asyncio.Future[None], LinkKey] = {}

    def holds(self, key: LinkKey) -> bool:
        """An idle link for `key` is parked here (it may still expire before it is taken)."""
        return key in self._idle

    async def take(self, key: LinkKey) -> AvatarLink | None:
        """The idle link for `key`, if this process has a usable one."""
        entry = self._idle.pop(key, None)
        if entry is None:
            return None
        link, timer = entry
        timer.cancel()
        await self._forget(key)
        if link.reusable:
            return link
        await link.close()
        return None

    async def park(self, link: AvatarLink, idle_s: float) -> None:
        link.control = None
        previous = self._idle.pop(link.key, None)
        if previous is not None:  # two links for one key: keep the newer
            previous[1].cancel()
            await previous[0].close()
        loop = asyncio.get_running_loop()
        self._idle[link.key] = (link, loop.call_later(idle_s, self._expire, link))
        with contextlib.suppress(RedisError):
            await self._redis.set(_holder_key(link.key), self._token, ex=int(idle_s) + 5)
        if self._watcher is None or self._watcher.done():
            self._watcher = loop.create_task(self._watch_releases())

    async def make_room(self, key: LinkKey) -> None:
        """Before starting an avatar cold: wait until no idle session for the same room and
        avatar is left. This process's own may be closing still; another process's is asked
        to leave (and waited for briefly). An old avatar made to leave by its identity, its
        stop failing, would otherwise take the new session out of the room with it."""
        await asyncio.gather(
            *(f for f, k in self._closing.items() if k == key), return_exceptions=True
        )
        try:
            holder = await self._redis.get(_holder_key(key))
            if holder is None or holder == self._token.encode():
                return
            await self._redis.set(_release_key(key), "1", ex=WARM_RELEASE_TTL_S)
            deadline = time.monotonic() + RELEASE_WAIT_S
            while time.monotonic() < deadline and await self._redis.exists(_holder_key(key)):
                await asyncio.sleep(RELEASE_POLL_S / 2)
        except RedisError as e:
            log.warning("warm avatars: cannot coordinate with other workers: %s", e)

    async def _watch_releases(self) -> None:
        while self._idle:
            await asyncio.sleep(RELEASE_POLL_S)
            for key in list(self._idle):
                try:
                    wanted = await self._redis.exists(_release_key(key))
                except RedisError:
                    continue
                if not wanted and (idle := self._idle.get(key)) is not None:
                    wanted = await slot_wanted(idle[0], self._redis, lanes=self._lanes)
                entry = self._idle.pop(key, None) if wanted else None
                if entry is not None:
                    entry[1].cancel()
                    with contextlib.suppress(RedisError):
                        await self._redis.delete(_release_key(key))
                    # The asker waits for the holder key, which goes once the avatar stopped.
                    self._close_soon(entry[0])

    async def _forget(self, key: LinkKey) -> None:
        with contextlib.suppress(RedisError):
            if await self._redis.get(_holder_key(key)) == self._token.encode():
                await self._redis.delete(_holder_key(key))

    def _expire(self, link: AvatarLink) -> None:
        entry = self._idle.get(link.key)
        if entry is not None and entry[0] is link:
            del self._idle[link.key]
        self._close_soon(link)

    def _close_soon(self, link: AvatarLink) -> None:
        """Close `link` in the background (the watcher goes on with other rooms meanwhile);
        `aclose` waits for it."""
        closing = asyncio.ensure_future(self._close_idle(link))
        self._closing[closing] = link.key
        closing.add_done_callback(self._closing.pop)

    async def _close_idle(self, link: AvatarLink) -> None:
        await link.close()
        if link.key not in self._idle:  # not parked again meanwhile
            await self._forget(link.key)

    async def aclose(self) -> None:
        """Close every idle link at once, and wait for those already closing (expired, or
        by an earlier call): a process exits only once its avatars stopped and their slots
        came back."""
        while self._idle:
            _key, (link, timer) = self._idle.popitem()
            timer.cancel()
            self._close_soon(link)
        await asyncio.gather(*self._closing, return_exceptions=True)


async def slot_wanted(link: AvatarLink, redis: aioredis.Redis, *, lanes: bool) -> bool:
    """Another job waits for a session slot of this link's avatar server and, with room
    lanes, the link's room has no next job at hand: its session gives the slot up early
    (False when Redis cannot say). A lane whose next job is parked, handed on or registered
    by its producer keeps its session: that job comes at once (`finish` hands it on, even
    from behind other rooms' jobs in the broker), and would otherwise start cold again,
    behind the line. One sent without `enqueue` and not delivered yet may come only after
    every job queued ahead of it, which can be the very jobs waiting for this slot. Without
    lanes a room's next job comes back through the broker, seconds later."""
    if link.quota is None:
        return False
    try:
        if await link.quota.demand() <= 0:
            return False
        if not lanes:
            return True
        at_hand = await next_job_at_hand(redis, link.key.room, link.job_id)
    except RedisError:
        return False
    return not at_hand
