"""The room and the avatar session a job plays through: an `AvatarLink`.

A link is a joined LiveKit room (held open, tasks/link/roomhold.py) plus an avatar session that
listens to this worker; `join_room` then `open_link` make one. Where a job's link comes from
(warm or cold) is tasks/link/links.py.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from livekit import rtc

from avatarq.errors import RoomError
from avatarq.settings import AvatarServer, Settings
from tasks.control import JobControl, StopReason
from tasks.link import room as rooms
from tasks.link import roomhold, tokens
from tasks.link.avatar import START_ANSWER_TIMEOUT_S, HttpAvatarClient
from tasks.link.quota import AvatarQuota, Slot
from tasks.link.roomhold import RoomHold
from tasks.link.stream import AudioStreamSender
from tasks.link.types import AvatarClient, AvatarSession, LinkKey, LinkRequest

log = logging.getLogger("avatarq.link")

#: A link's keeper joins beside its job when the room stays open this long yet.
KEEPER_JOIN_S = 30.0


@dataclass(frozen=True)
class RoomAdmin:
    """What it takes to make a participant leave a room (RoomService credentials)."""

    url: str
    api_key: str
    api_secret: str = field(repr=False)

    @classmethod
    def of(cls, settings: Settings) -> RoomAdmin:
        secret = settings.livekit_api_secret.get_secret_value()
        return cls(settings.livekit_url, settings.livekit_api_key, secret)


@dataclass
class AvatarLink:
    """A joined room with a ready avatar, used by one job at a time."""

    key: LinkKey
    room: rtc.Room
    sender: AudioStreamSender
    avatar: AvatarClient
    admin: RoomAdmin
    #: The hidden participant that keeps the room open while the link lives (tasks/link/room.py),
    #: where the room's own timeouts (`hold`, tasks/link/roomhold.py) do not.
    keeper: rtc.Room | None = None
    hold: RoomHold | None = None
    session: AvatarSession | None = None
    #: The session slot of the avatar server's quota that this link holds while it lives.
    quota: AvatarQuota | None = None
    slot: Slot | None = None
    control: JobControl | None = None
    #: The job it plays, or played last: a room with no other job may give its session up.
    job_id: str | None = None
    #: Set once the room or the avatar is gone: the link must not be used again.
    broken: StopReason | None = None
    #: The close under way or done: every `close()` waits for this one.
    _closing: asyncio.Future[None] | None = field(default=None, repr=False)
    _keeper_join: asyncio.Future[rtc.Room] | None = field(default=None, repr=False)
    #: The close a lapsing slot began (held: the loop keeps only a weak reference to a task).
    _lapse_close: asyncio.Future[None] | None = field(default=None, repr=False)

    @property
    def session_id(self) -> str | None:
        return self.session.session_id if self.session else None

    def attach(self, control: JobControl) -> None:
        self.control = control
        if self.broken is not None:
            control.request_stop(self.broken)

    def own_slot(self, quota: AvatarQuota, slot: Slot) -> None:
        """The link releases `slot` (renewed since it was taken) once its session ended."""
        self.quota, self.slot = quota, slot
        slot.on_lapse = self._slot_lapsing

    def _slot_lapsing(self) -> None:
        """The slot could not be renewed (Redis out of reach): the session ends now, before
        the slot can lapse and let another worker start a session over the quota. A job on the
        link has been fenced by its own lease already (tasks/control.py), but its run may
        still be waiting on Redis to record that: it stops as for an avatar that left."""
        self.lost(StopReason.AVATAR_LEFT)
        if self._closing is None:
            self._lapse_close = asyncio.ensure_future(self.close())

    def lost(self, reason: StopReason) -> None:
        """The room or avatar went away: stop the job using the link, and never reuse it."""
        if self.broken is None:
            self.broken = reason
        if self.control is not None:
            self.control.request_stop(reason)

    async def cover(self, request: LinkRequest, settings: Settings) -> None:
        """Before each job on this link, its first included: a room whose own timeouts end
        before the job could (they count from its creation) gets its keeper. It joins beside
        the job when the room stays open long enough for that, so a start does not wait for
        it."""
        if self.keeper is not None or self._keeper_join is not None or self.hold is None:
            return
        if self.hold.covers(request.budget.room_hold(request.duration)):
            return
        log.info(
            "room %s (timeouts %ds empty / %ds departure) closes before this job could end: "
            "joining a keeper",
            self.key.room,
            self.hold.empty_timeout_s,
            self.hold.departure_timeout_s,
        )
        token = _tokens(request, settings).keeper
        join = asyncio.ensure_future(rooms.connect(settings.livekit_url, token))
        if not self.hold.covers(KEEPER_JOIN_S):
            self.keeper = await join
            return
        self._keeper_join = join
        join.add_done_callback(self._keeper_joined)

    def _keeper_joined(self, join: asyncio.Future[rtc.Room]) -> None:
        if self._closing is not None or join.cancelled():
            return  # close() took the keeper, or stopped its join
        if join.exception() is not None:
            # The room's own timeouts still hold it a while; a close there cuts the job off
            # as a lost room, which is retried.
            log.warning("room %s: the keeper could not join: %s", self.key.room, join.exception())
            return
        self.keeper = join.result()

    @property
    def reusable(self) -> bool:
        return self.broken is None and self._closing is None and self.room.isconnected()

    async def close(self) -> None:
        """Stop the avatar session and leave the room (idempotent, best effort). An avatar
        whose server could not confirm the stop (no session id, no stop endpoint, an error) is
        removed from the room, so it never goes on rendering after its job.

        A close runs to its end even when its caller is cancelled (a job's deadline, a
        hand-back): cut off midway, it would leave the session rendering on a slot renewed
        for as long as the process lives. Every call waits for the same close."""
        if self._closing is None:
            self._closing = asyncio.ensure_future(self._close())
        await asyncio.shield(self._closing)

    async def _close(self) -> None:
        join = self._keeper_join
        if join is not None and not join.done():
            join.cancel()
        elif join is not None and not join.cancelled() and join.exception() is None:
            # Joined, and its callback may not have run yet: leave with it all the same.
            self.keeper = join.result()
        if self.session is not None and not await self.avatar.stop(self.session):
            await rooms.remove_participant(
                self.admin.url,
                self.admin.api_key,
                self.admin.api_secret,
                room=self.key.room,
                identity=self.sender.avatar_identity,
            )
        # The session is over: its slot goes to the next room now, not after this worker's
        # own leaving (its state messages in flight wait out their RPC timeout).
        if self.quota is not None and self.slot is not None:
            await self.quota.release(self.slot)
        await self.avatar.aclose()
        await self.sender.aclose()
        await rooms.disconnect(self.room)
        await rooms.disconnect(self.keeper)


def _tokens(request: LinkRequest, settings: Settings) -> tokens.JobTokens:
    job = request.job
    return tokens.mint(
        settings,
        room=job.room,
        worker_identity=job.worker_identity,
        avatar_identity=job.avatar_identity,
        ttl=tokens.ttl_for(request.duration, settings),
    )


#: Makes the client of one avatar server: the seam for another implementation of the
#: protocol (the Avaluma plugin's, where it installs).
AvatarClientFactory = Callable[[AvatarServer, Settings], AvatarClient]


def http_avatar_client(server: AvatarServer, settings: Settings) -> AvatarClient:
    """The Avaluma HTTP protocol spoken directly (tasks/link/avatar.py), the license key from
    the server's settings."""
    return HttpAvatarClient(
        server.name,
        server.base_url,
        settings.avatar_license_key(server),
        attempts=settings.avatar_start_attempts,
    )


@dataclass
class JoinedRoom:
    """A job's room, held open and joined, before its avatar is asked for: a cold start
    joins while it waits for its avatar session slot, and while a remote source opens
    (tasks/link/links.py)."""

    room: rtc.Room
    hold: RoomHold

    async def leave(self) -> None:
        await rooms.disconnect(self.room)


async def join_room(request: LinkRequest, settings: Settings) -> JoinedRoom:
    """Hold the room open and join it. Whether it needs a keeper is decided once the source's
    length is known (`AvatarLink.cover`).

    Joined before the source's length may be known: the worker's token, which never leaves
    this process, then lives as long as the longest job may."""
    job = request.job
    # The room stays open by its own timeouts where this worker creates it, asked for as long
    # as the longest job it may play (they count from its creation: back-to-back warm jobs
    # keep it an hour by default).
    hold = await roomhold.hold_room_open(settings, job.room, request.budget.room_hold(None))
    room = await rooms.connect(settings.livekit_url, _tokens(request, settings).worker)
    request.timestamps.room_joined = time.time()
    return JoinedRoom(room, hold)


async def open_link(
    request: LinkRequest,
    joined: JoinedRoom,
    settings: Settings,
    avatar_client: AvatarClientFactory = http_avatar_client,
) -> AvatarLink:
    """Start the avatar in the joined room and wait until it listens to us; ready to stream
    when it returns. The link owns the room from here (closed with it on failure).

    Asked for only once we are in: an avatar whose join starts before ours is done may learn
    of us seconds later, from the server's batched updates (docs/scheduling.md)."""
    job, server = request.job, request.server
    room = joined.room
    if not room.isconnected():  # lost for good while the job waited for its slot
        await joined.leave()
        raise RoomError(f"lost the LiveKit room {job.room!r} while waiting for an avatar slot")
    sender = AudioStreamSender(room, job.avatar_identity, server.sample_rate)
    link = AvatarLink(
        request.key,
        room,
        sender,
        avatar_client(server, settings),
        RoomAdmin.of(settings),
        hold=joined.hold,
        job_id=job.job_id,
    )
    # Fired only once the SDK gave up reconnecting: the room is lost for good.
    room.on("disconnected", lambda *_: link.lost(StopReason.ROOM_LOST))
    # An earlier session of this avatar still leaving the room is not ours.
    stale = rooms.session_of(room, job.avatar_identity)
    try:
        await link.cover(request, settings)
        request.timestamps.avatar_requested = time.time()
        link.session = await link.avatar.start(
            livekit_url=settings.livekit_url,
            # Minted now that the source's length is known: it goes to the avatar server.
            livekit_token=_tokens(request, settings).avatar,
            avatar_id=job.avatar_id,
            avatar_identity=job.avatar_identity,
        )
        await request.note_session(job.job_id, server.name, link.session.session_id)
        identity = link.session.participant_identity
        join_timeout = settings.avatar_join_timeout_s
        if not link.session.acknowledged:
            # The start answer was lost: a cold start may take the whole answer timeout.
            join_timeout += START_ANSWER_TIMEOUT_S
        await rooms.wait_until_ready(
            room,
            identity,
            join_timeout=join_timeout,
            listen_timeout=settings.avatar_join_timeout_s,
            not_sid=stale,
        )
    except BaseException:
        await link.close()
        raise
    request.timestamps.avatar_ready = time.time()
    rooms.on_leave(room, identity, link.lost, StopReason.AVATAR_LEFT)
    return link
