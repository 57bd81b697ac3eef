"""Warm avatars: a room connection and its avatar session, kept between back-to-back jobs.

Starting an avatar costs the avatar server seconds (a GPU session); joining a room costs the
worker a few hundred milliseconds. When the next job of the same room and avatar comes to the
same worker process within `AVATARQ_WARM_IDLE` seconds, it plays as a new segment on the same
session. Per-room ordering (avatarq/ledger/) already makes such jobs sequential.

The avatar's identity is fixed (`avatar-{id}`), so a second session for the same room and
avatar would knock the idle one out of the room. A process that must start a session cold
therefore first asks whichever process holds an idle one to let it go (a Redis marker per room
and avatar, and a release request the holder watches for).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from dataclasses import dataclass, field

import redis.asyncio as aioredis
from livekit import rtc
from redis.exceptions import RedisError

from avatarq.ledger.keys import WARM_RELEASE_TTL_S, warm_holder_key, warm_release_key
from tasks import room as rooms
from tasks.avatar import AvatarClient, AvatarSession
from tasks.control import JobControl, StopReason
from tasks.quota import AvatarQuota, Slot
from tasks.stream import AudioStreamSender

log = logging.getLogger("avatarq.warm")

#: (room, avatar identity, avatar server name, sample rate): what a next job must match.
LinkKey = tuple[str, str, str, int]
#: How often a process holding idle sessions checks for release requests.
RELEASE_POLL_S = 0.2
#: How long a cold start waits for another process to let its idle session go.
RELEASE_WAIT_S = 3.0


def _holder_key(key: LinkKey) -> str:
    return warm_holder_key(key[0], key[1])


def _release_key(key: LinkKey) -> str:
    return warm_release_key(key[0], key[1])


@dataclass(frozen=True)
class RoomAdmin:
    """What it takes to make a participant leave a room (RoomService credentials)."""

    url: str
    api_key: str
    api_secret: str = field(repr=False)


@dataclass
class AvatarLink:
    """A joined room with a ready avatar, used by one job at a time."""

    key: LinkKey
    room: rtc.Room
    sender: AudioStreamSender
    avatar: AvatarClient
    admin: RoomAdmin
    #: The hidden participant that keeps the room open while the link lives (tasks/room.py).
    keeper: rtc.Room | None = None
    session: AvatarSession | None = None
    #: The session slot of the avatar server's quota that this link holds while it lives.
    quota: AvatarQuota | None = None
    slot: Slot | None = None
    control: JobControl | None = None
    #: Set once the room or the avatar is gone: the link must not be used again.
    broken: StopReason | None = None
    _closed: bool = field(default=False, repr=False)

    def attach(self, control: JobControl) -> None:
        self.control = control
        if self.broken is not None:
            control.request_stop(self.broken)

    def hold_slot(self, quota: AvatarQuota, slot: Slot) -> None:
        self.quota, self.slot = quota, slot
        quota.hold(slot)

    def lost(self, reason: StopReason) -> None:
        """The room or avatar went away: stop the job using the link, and never reuse it."""
        if self.broken is None:
            self.broken = reason
        if self.control is not None:
            self.control.request_stop(reason)

    @property
    def reusable(self) -> bool:
        return self.broken is None and not self._closed and self.room.isconnected()

    async def close(self) -> None:
        """Stop the avatar session and leave the room (idempotent, best effort). An avatar
        whose server could not confirm the stop (no session id, no stop endpoint, an error) is
        removed from the room, so it never goes on rendering after its job."""
        if self._closed:
            return
        self._closed = True
        if self.session is not None and not await self.avatar.stop(self.session):
            await rooms.remove_participant(
                self.admin.url,
                self.admin.api_key,
                self.admin.api_secret,
                room=self.key[0],
                identity=self.sender.avatar_identity,
            )
        await self.avatar.aclose()
        await self.sender.aclose()
        await rooms.disconnect(self.room)
        await rooms.disconnect(self.keeper)
        if self.quota is not None and self.slot is not None:
            await self.quota.release(self.slot)


class WarmPool:
    """Idle links of this worker process, each closed after its idle window or on request."""

    def __init__(self, redis_url: str) -> None:
        self._redis = aioredis.from_url(redis_url)
        self._token = uuid.uuid4().hex
        self._idle: dict[LinkKey, tuple[AvatarLink, asyncio.TimerHandle]] = {}
        self._watcher: asyncio.Task[None] | None = None

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
        """Before starting an avatar cold: ask another process's idle session for the same
        room and avatar to leave, and wait (briefly) until it has."""
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
                    wanted = await self._slot_wanted(idle[0])
                entry = self._idle.pop(key, None) if wanted else None
                if entry is not None:
                    entry[1].cancel()
                    await entry[0].close()
                    await self._forget(key)
                    with contextlib.suppress(RedisError):
                        await self._redis.delete(_release_key(key))

    @staticmethod
    async def _slot_wanted(link: AvatarLink) -> bool:
        """Another job waits for a session slot of this link's avatar server: an idle
        session gives its slot up early."""
        if link.quota is None:
            return False
        try:
            return await link.quota.demand() > 0
        except RedisError:
            return False

    async def _forget(self, key: LinkKey) -> None:
        with contextlib.suppress(RedisError):
            if await self._redis.get(_holder_key(key)) == self._token.encode():
                await self._redis.delete(_holder_key(key))

    def _expire(self, link: AvatarLink) -> None:
        entry = self._idle.get(link.key)
        if entry is not None and entry[0] is link:
            del self._idle[link.key]
        asyncio.get_running_loop().create_task(self._close_expired(link))

    async def _close_expired(self, link: AvatarLink) -> None:
        await link.close()
        if link.key not in self._idle:
            await self._forget(link.key)

    async def aclose(self) -> None:
        while self._idle:
            key, (link, timer) = self._idle.popitem()
            timer.cancel()
            await link.close()
            await self._forget(key)


_pool: WarmPool | None = None


def warm_pool(redis_url: str) -> WarmPool:
    """This process's pool (one event loop per worker process, see tasks/runtime.py)."""
    global _pool
    if _pool is None:
        _pool = WarmPool(redis_url)
    return _pool


async def close_idle() -> None:
    """Let every idle avatar of this process go (worker shutdown: no job will reuse them)."""
    if _pool is not None:
        await _pool.aclose()
