"""Join the job's LiveKit room, keep it open, and wait until the avatar is listening.

A keeper joins only a room that existed with timeouts too short for the job; the avatar's
audio is subscribed until its video appears; nothing is streamed until its receiver answers
`lk.clear_buffer` for us. Why: what livekit-server and `AvatarRunner` do (docs/protocol.md)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import TypeVar

from livekit import api, rtc

from avatarq.errors import AvatarTimeout, LiveKitRejected, Reason, RoomError
from tasks import compat

log = logging.getLogger("avatarq.room")

CONNECT_TIMEOUT_S = 20.0
#: Wire names of livekit-agents' avatar receiver (voice/avatar/_datastream_io.py).
RPC_CLEAR_BUFFER = "lk.clear_buffer"
#: What a receiver bound to another sender answers our probe.
RECEIVER_REJECTED = "reject"
PROBE_INTERVAL_S = 0.2
PROBE_RPC_TIMEOUT_S = 2.0
T = TypeVar("T")


async def connect(
    url: str, token: str, *, timeout: float = CONNECT_TIMEOUT_S, route_events: bool = True
) -> rtc.Room:
    """Join; `route_events`: give the room only its own FFI events (tasks/compat.py)."""
    room = rtc.Room()
    try:
        # Subscriptions are chosen by hand (the avatar's audio only, see wait_for_avatar).
        options = rtc.RoomOptions(auto_subscribe=False)
        async with asyncio.timeout(timeout):
            await room.connect(url, token, options)
    except (TimeoutError, rtc.ConnectError) as e:
        await room.disconnect()
        # The server's answer may echo the token: never let it into results or logs.
        text = (str(e) or "timed out").replace(token, "***")
        if _unauthorized(text):
            raise LiveKitRejected(
                f"the LiveKit server at {url} refused our token ({text}): check "
                "LIVEKIT_API_KEY / LIVEKIT_API_SECRET"
            ) from None
        raise RoomError(f"could not join the LiveKit room at {url}: {text}") from None
    if route_events:
        compat.route_own_events(room)
    return room


def _unauthorized(text: str) -> bool:
    lowered = text.lower()
    return "401" in lowered or "unauthorized" in lowered or "invalid token" in lowered


def _audio_publications(p: rtc.RemoteParticipant) -> list[rtc.RemoteTrackPublication]:
    return [t for t in p.track_publications.values() if t.kind == rtc.TrackKind.KIND_AUDIO]


def _has_video(participant: rtc.RemoteParticipant) -> bool:
    return any(p.kind == rtc.TrackKind.KIND_VIDEO for p in participant.track_publications.values())


def session_of(room: rtc.Room, identity: str) -> str | None:
    """The session id (sid) under which `identity` is in the room now, if it is."""
    present = room.remote_participants.get(identity)
    return present.sid if present is not None else None


async def wait_for_avatar(
    room: rtc.Room,
    identity: str,
    *,
    timeout: float,
    not_sid: str | None = None,
    publishing: asyncio.Event | None = None,
) -> None:
    """Until participant `identity` is in the room and publishes video (it is rendering).
    `not_sid`: a session of that identity that was there before ours was asked for (one that
    is still leaving) does not count. `publishing` is set once it publishes any track.

    Subscribes to its audio meanwhile, which is what releases an AvatarRunner's video; once
    the video is there the audio is let go again (the worker never plays it)."""
    ready = asyncio.Event()

    def check(*_: object) -> None:
        p = room.remote_participants.get(identity)
        if p is None or (not_sid is not None and p.sid == not_sid):
            return
        if publishing is not None and p.track_publications:
            publishing.set()
        if _has_video(p):
            ready.set()
            return
        for publication in _audio_publications(p):
            if not publication.subscribed:
                publication.set_subscribed(True)

    room.on("participant_connected", check)
    room.on("track_published", check)
    try:
        check()
        async with asyncio.timeout(timeout):
            await ready.wait()
    except TimeoutError:
        p = room.remote_participants.get(identity)
        if p is None:
            what = "never joined the room"
        elif _audio_publications(p):
            what = "published audio but no video"
        else:
            what = "joined but published no video"
        raise AvatarTimeout(f"avatar {identity!r} {what} within {timeout:g}s") from None
    finally:
        room.off("participant_connected", check)
        room.off("track_published", check)
    avatar = room.remote_participants.get(identity)
    for publication in _audio_publications(avatar) if avatar else []:
        if publication.subscribed:
            publication.set_subscribed(False)


async def wait_until_listening(room: rtc.Room, identity: str, *, timeout: float) -> None:
    """Until the avatar's audio receiver answers for us: registered, and bound to this
    worker rather than to another agent in the room."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last = "no answer"
    while True:
        try:
            answer = await room.local_participant.perform_rpc(
                destination_identity=identity,
                method=RPC_CLEAR_BUFFER,
                payload="",
                response_timeout=PROBE_RPC_TIMEOUT_S,
            )
        except rtc.RpcError as e:
            last = f"{e.message or 'RPC error'} ({e.code})"
        else:
            if answer != RECEIVER_REJECTED:
                return
            # Bound for the session's life: waiting cannot help, a new session (retry) may.
            raise AvatarTimeout(
                f"avatar {identity!r} is in the room but its receiver listens to another "
                "participant (an agent that joined before this worker)",
                reason=Reason.AVATAR_NOT_LISTENING,
            )
        if loop.time() + PROBE_INTERVAL_S >= deadline:
            raise AvatarTimeout(
                f"avatar {identity!r} is in the room but not listening to this worker "
                f"within {timeout:g}s: {last}",
                reason=Reason.AVATAR_NOT_LISTENING,
            )
        await asyncio.sleep(PROBE_INTERVAL_S)


async def wait_until_ready(
    room: rtc.Room,
    identity: str,
    *,
    join_timeout: float,
    listen_timeout: float,
    not_sid: str | None = None,
) -> None:
    """Until the avatar renders (`wait_for_avatar`) and listens to us (`wait_until_listening`).

    The probe begins once the avatar publishes a track, not once its video is there: an
    AvatarRunner registers its receiver before it publishes, so the answer comes while its
    video still waits for our audio subscription, and the start saves a round trip."""
    publishing = asyncio.Event()
    rendering = asyncio.ensure_future(
        wait_for_avatar(
            room, identity, timeout=join_timeout, not_sid=not_sid, publishing=publishing
        )
    )

    async def probe() -> None:
        await publishing.wait()
        await wait_until_listening(room, identity, timeout=listen_timeout)

    listening = asyncio.ensure_future(probe())
    try:
        await asyncio.gather(rendering, listening)  # the first failure ends the wait
    finally:
        for task in (rendering, listening):
            task.cancel()
        await asyncio.gather(rendering, listening, return_exceptions=True)


def on_leave(room: rtc.Room, identity: str, callback: Callable[[T], None], arg: T) -> None:
    """Call `callback(arg)` when participant `identity`, as it is in the room now, leaves.

    Matched by session id too: an earlier session under the same identity (a handed-back
    job's avatar, knocked out by ours) may be reported gone only after ours is in."""
    sid = session_of(room, identity)

    def check(participant: rtc.RemoteParticipant) -> None:
        if participant.identity == identity and sid in (None, participant.sid):
            callback(arg)

    room.on("participant_disconnected", check)


async def disconnect(room: rtc.Room | None) -> None:
    if room is not None:
        with contextlib.suppress(Exception):
            await room.disconnect()


async def remove_participant(
    url: str, api_key: str, api_secret: str, *, room: str, identity: str
) -> None:
    """Make `identity` leave `room` (an avatar whose session we could not stop). Best effort:
    a participant already gone is the outcome we wanted."""
    lkapi = api.LiveKitAPI(url, api_key, api_secret)
    try:
        await lkapi.room.remove_participant(
            api.RoomParticipantIdentity(room=room, identity=identity)
        )
    except Exception as e:  # noqa: BLE001 - twirp errors, network: nothing more to do
        log.debug("remove %s from %s: %s", identity, room, e)
    finally:
        await lkapi.aclose()
