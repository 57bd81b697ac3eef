"""Warm avatars: a room connection and its avatar session, kept between back-to-back jobs.

Starting an avatar costs the avatar server seconds (a GPU session); joining a room costs the
worker a few hundred milliseconds. When the next job of the same room and avatar comes to the
same worker process within `AVATARQ_WARM_IDLE` seconds, it plays as a new segment on the same
session. Per-room ordering (tasks/ledger.py) already makes such jobs sequential.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field

from livekit import rtc

from tasks.avatar import AvatarClient, AvatarSession
from tasks.control import JobControl, StopReason
from tasks.stream import AudioStreamSender

log = logging.getLogger("avatarq.warm")

#: (room, avatar identity, avatar server URL, sample rate): what a next job must match.
LinkKey = tuple[str, str, str, int]


@dataclass
class AvatarLink:
    """A joined room with a ready avatar, used by one job at a time."""

    key: LinkKey
    room: rtc.Room
    sender: AudioStreamSender
    avatar: AvatarClient
    session: AvatarSession | None = None
    control: JobControl | None = None
    #: Set once the room or the avatar is gone: the link must not be used again.
    broken: StopReason | None = None
    _closed: bool = field(default=False, repr=False)

    def attach(self, control: JobControl) -> None:
        self.control = control
        if self.broken is not None:
            control.request_stop(self.broken)

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
        """Stop the avatar session and leave the room (idempotent, best effort)."""
        if self._closed:
            return
        self._closed = True
        if self.session is not None:
            await self.avatar.stop(self.session)
        await self.avatar.aclose()
        with contextlib.suppress(Exception):
            await self.room.disconnect()


class WarmPool:
    """Idle links of this worker process, each closed after its idle window."""

    def __init__(self) -> None:
        self._idle: dict[LinkKey, tuple[AvatarLink, asyncio.TimerHandle]] = {}

    def take(self, key: LinkKey) -> AvatarLink | None:
        entry = self._idle.pop(key, None)
        if entry is None:
            return None
        link, timer = entry
        timer.cancel()
        if link.reusable:
            return link
        asyncio.get_running_loop().create_task(link.close())
        return None

    def park(self, link: AvatarLink, idle_s: float) -> None:
        link.control = None
        loop = asyncio.get_running_loop()
        previous = self._idle.pop(link.key, None)
        if previous is not None:  # two links for one key: keep the newer
            previous[1].cancel()
            loop.create_task(previous[0].close())
        timer = loop.call_later(idle_s, self._expire, link)
        self._idle[link.key] = (link, timer)

    def _expire(self, link: AvatarLink) -> None:
        entry = self._idle.get(link.key)
        if entry is not None and entry[0] is link:
            del self._idle[link.key]
        asyncio.get_running_loop().create_task(link.close())

    async def aclose(self) -> None:
        while self._idle:
            _key, (link, timer) = self._idle.popitem()
            timer.cancel()
            await link.close()


_pool: WarmPool | None = None


def warm_pool() -> WarmPool:
    """This process's pool (one event loop per worker process, see tasks/runtime.py)."""
    global _pool
    if _pool is None:
        _pool = WarmPool()
    return _pool
