"""When a started avatar counts as ready (tasks/link/room.py `wait_until_ready`), on a stand-in
room: the fast seam beside the end-to-end starts against the emulator (tests/test_fidelity.py).

An AvatarRunner registers its receiver, publishes audio, waits for a subscription, then
publishes video: the receiver is probed as soon as a track is there, not after the video."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
from livekit import rtc

from avatarq.errors import AvatarTimeout, Reason
from tasks.link import room as rooms

AVATAR = "avatar-a"


class Publication:
    def __init__(self, kind: rtc.TrackKind.ValueType) -> None:
        self.kind, self.subscribed = kind, False

    def set_subscribed(self, subscribed: bool) -> None:
        self.subscribed = subscribed


class Avatar:
    sid, identity = "PA_avatar", AVATAR

    def __init__(self) -> None:
        self.track_publications: dict[str, Publication] = {}


class Worker:
    def __init__(self, room: Room, answer: str) -> None:
        self.room, self.answer = room, answer
        #: For each probe: whether the avatar's video was there yet.
        self.probes: list[bool] = []

    async def perform_rpc(self, *, destination_identity: str, method: str, **_: Any) -> str:
        assert (destination_identity, method) == (AVATAR, rooms.RPC_CLEAR_BUFFER)
        avatar = self.room.remote_participants[AVATAR]
        kinds = [p.kind for p in avatar.track_publications.values()]
        self.probes.append(rtc.TrackKind.KIND_VIDEO in kinds)
        return self.answer


class Room:
    def __init__(self, answer: str = "ok") -> None:
        self.remote_participants: dict[str, Avatar] = {}
        self.local_participant = Worker(self, answer)
        self._handlers: dict[str, list[Callable[..., None]]] = {}

    def on(self, event: str, handler: Callable[..., None]) -> None:
        self._handlers.setdefault(event, []).append(handler)

    def off(self, event: str, handler: Callable[..., None]) -> None:
        self._handlers[event].remove(handler)

    def publish(self, kind: rtc.TrackKind.ValueType) -> Publication:
        publication = Publication(kind)
        self.remote_participants[AVATAR].track_publications[str(kind)] = publication
        for handler in list(self._handlers.get("track_published", [])):
            handler()
        return publication


def ready(room: Room) -> asyncio.Future[None]:
    return asyncio.ensure_future(
        rooms.wait_until_ready(room, AVATAR, join_timeout=5.0, listen_timeout=5.0)  # type: ignore[arg-type]
    )


def test_the_receiver_answers_while_the_video_waits_for_our_subscription() -> None:
    room = Room()

    async def go() -> Publication:
        waiting = ready(room)
        await asyncio.sleep(0.05)
        room.remote_participants[AVATAR] = Avatar()
        audio = room.publish(rtc.TrackKind.KIND_AUDIO)
        await asyncio.sleep(0.05)
        assert room.local_participant.probes == [False]  # answered, no video yet
        assert audio.subscribed and not waiting.done()  # our subscription releases the video
        room.publish(rtc.TrackKind.KIND_VIDEO)
        await asyncio.wait_for(waiting, 1.0)
        return audio

    audio = asyncio.run(go())
    assert not audio.subscribed  # let go once the video is there


def test_a_receiver_bound_to_another_agent_fails_the_start_before_any_video() -> None:
    room = Room(answer=rooms.RECEIVER_REJECTED)
    room.remote_participants[AVATAR] = Avatar()

    async def go() -> None:
        waiting = ready(room)
        room.publish(rtc.TrackKind.KIND_AUDIO)
        with pytest.raises(AvatarTimeout) as info:
            await asyncio.wait_for(waiting, 1.0)
        assert info.value.reason == Reason.AVATAR_NOT_LISTENING

    asyncio.run(go())
