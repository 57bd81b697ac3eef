"""Join the job's LiveKit room and wait for the avatar to be ready in it."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TypeVar

from livekit import rtc

from avatarq.errors import AvatarTimeout, RoomError

CONNECT_TIMEOUT_S = 20.0
T = TypeVar("T")


async def connect(url: str, token: str, *, timeout: float = CONNECT_TIMEOUT_S) -> rtc.Room:
    room = rtc.Room()
    try:
        # Audio travels as data, so nothing needs subscribing; saves decoding the avatar's video.
        options = rtc.RoomOptions(auto_subscribe=False)
        await asyncio.wait_for(room.connect(url, token, options), timeout)
    except (TimeoutError, rtc.ConnectError) as e:
        await room.disconnect()
        raise RoomError(f"could not join the LiveKit room at {url}: {e or 'timed out'}") from None
    return room


def _has_video(participant: rtc.RemoteParticipant) -> bool:
    return any(p.kind == rtc.TrackKind.KIND_VIDEO for p in participant.track_publications.values())


async def wait_for_avatar(room: rtc.Room, identity: str, *, timeout: float) -> None:
    """Until participant `identity` is in the room and has published video (it is rendering)."""
    ready = asyncio.Event()

    def check(*_: object) -> None:
        p = room.remote_participants.get(identity)
        if p is not None and _has_video(p):
            ready.set()

    room.on("participant_connected", check)
    room.on("track_published", check)
    try:
        check()
        await asyncio.wait_for(ready.wait(), timeout)
    except TimeoutError:
        joined = identity in room.remote_participants
        what = "joined but published no video" if joined else "never joined the room"
        raise AvatarTimeout(f"avatar {identity!r} {what} within {timeout:g}s") from None
    finally:
        room.off("participant_connected", check)
        room.off("track_published", check)


def on_leave(room: rtc.Room, identity: str, callback: Callable[[T], None], arg: T) -> None:
    """Call `callback(arg)` when participant `identity` leaves the room."""

    def check(participant: rtc.RemoteParticipant) -> None:
        if participant.identity == identity:
            callback(arg)

    room.on("participant_disconnected", check)
