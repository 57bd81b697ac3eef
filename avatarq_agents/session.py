"""`AvatarSession` for livekit-agents: the Avaluma plugin's shape on avatarq's fleet parts.

A conversational session takes a slot of the avatar server's fleet-wide quota like a batch
job, starts the avatar with avatarq's client, waits until it renders and listens, and gives
the `AgentSession` an audio output on avatarq's sender (avatarq_agents/output.py)."""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Any

import redis.asyncio as aioredis
from livekit import rtc
from livekit.agents import AgentSession, get_job_context
from livekit.agents.voice import avatar

from avatarq import redisclient
from avatarq.errors import AvatarOverLimit
from avatarq.settings import AvatarServer, Settings, get_settings
from avatarq_agents.lane import RoomLane
from avatarq_agents.output import AvatarAudioOutput
from avatarq_agents.turns import AgentLinks
from tasks.link import room as rooms
from tasks.link import tokens
from tasks.link.avatar import START_ANSWER_TIMEOUT_S
from tasks.link.link import RoomAdmin, http_avatar_client
from tasks.link.quota import AvatarQuota, Slot, wait_for_slot
from tasks.link.stream import AudioStreamSender
from tasks.link.types import AvatarClient, LinkKey, NoAvatarSlot
from tasks.link.types import AvatarSession as ServerSession
from tasks.link.warm import WarmPool

log = logging.getLogger("avatarq.agents")

#: How long `start` waits for a free session slot of the avatar server by default.
SLOT_TIMEOUT_S = 30.0


class AvatarSlotTimeout(TimeoutError):
    """No session slot of the avatar server came free in time (the fleet is at its quota)."""


class AvatarSession(avatar.AvatarSession[Any]):
    """An avatar for one `AgentSession` in one room: `await start(agent_session, room=...)`,
    then `await aclose()` (also called at the job's shutdown)."""

    def __init__(
        self,
        *,
        avatar_id: str,
        avatar_server: str | None = None,
        settings: Settings | None = None,
        slot_timeout: float = SLOT_TIMEOUT_S,
        announcements: bool = True,
    ) -> None:
        """`avatar_server`: a configured server's name or URL (the license key is only ever
        sent to a configured server); the default server when omitted. `announcements`: the
        room's batch jobs play through this session (avatarq_agents/lane.py)."""
        super().__init__()
        self.settings = settings or get_settings()
        self.server = _configured_server(self.settings, avatar_server)
        self.avatar_id = avatar_id
        self.slot_timeout = slot_timeout
        self.announcements = announcements
        #: Plays the room's batch jobs through this avatar while the session lives.
        self.lane: RoomLane | None = None
        self.audio_output: AvatarAudioOutput | None = None
        self.server_session: ServerSession | None = None
        self._identity = f"avatar-{avatar_id}"
        self._redis: aioredis.Redis | None = None
        self._quota: AvatarQuota | None = None
        self._slot: Slot | None = None
        self._client: AvatarClient | None = None
        self._sender: AudioStreamSender | None = None
        self._room_name = ""
        self._closed = False
        #: The close a lapsing slot began (held: the loop keeps only a weak reference).
        self._lapse_close: asyncio.Future[None] | None = None

    @property
    def avatar_identity(self) -> str:
        return self._identity

    @property
    def provider(self) -> str:
        return "avatarq"

    async def start(self, agent_session: AgentSession, room: rtc.Room) -> None:
        """Wait for a session slot, start the avatar and wait until it renders and listens
        to this participant; then the session's speech goes to it. Raises
        `AvatarSlotTimeout` when no slot came free within `slot_timeout`, `RoomHeld` when
        another agent holds the room or its batch job played on as long. Connects the job's
        room first if it is not yet (the avatar's token names this participant)."""
        if not room.isconnected():
            job_ctx = get_job_context(required=False)
            if job_ctx is None:
                raise RuntimeError("connect the room before starting the avatar")
            await job_ctx.connect()
        await super().start(agent_session, room)
        self._room_name = room.name
        try:
            if self.announcements:
                # First: from here on no worker starts a job in the room, and one playing ends
                # before this avatar speaks.
                self.lane = RoomLane(self.settings, room.name)
                await self.lane.hold(self.slot_timeout)
            await self._take_slot(room.name)
            await self._start_avatar(room)
        except BaseException:
            await self.aclose()
            raise
        assert self._sender is not None
        self.audio_output = AvatarAudioOutput(
            self._sender,
            lead=self.settings.default_lead_s,
            report_timeout=self.settings.playback_finished_timeout_s,
        )
        agent_session.output.audio = self.audio_output
        if self.lane is not None:
            assert self.server_session is not None
            session_id = self.server_session.session_id
            self.lane.start(AgentLinks(agent_session, self.audio_output, session_id))

    async def _take_slot(self, room: str) -> None:
        self._redis = redisclient.async_client(self.settings.redis_url)
        quota = self._quota = AvatarQuota(self._redis, self.server.name, self.server.max_sessions)
        holder = f"agent-{room}-{uuid.uuid4().hex[:8]}"
        try:
            self._slot = await wait_for_slot(quota, holder, patience_s=self.slot_timeout)
        except NoAvatarSlot as e:
            await quota.leave_line(holder)
            raise AvatarSlotTimeout(
                f"no session slot of avatar server {self.server.name!r} came free within "
                f"{self.slot_timeout:g}s ({e})"
            ) from None
        quota.hold(self._slot)
        self._slot.on_lapse = self._slot_lapsing

    def _slot_lapsing(self) -> None:
        """The slot could not be renewed (Redis out of reach): the avatar session ends before
        the slot can lapse and let a worker start a session over the quota."""
        log.warning("avatar server %r: the agent's slot is lapsing; ending its avatar session",
                    self.server.name)  # fmt: skip
        self._lapse_close = asyncio.ensure_future(self.aclose())

    async def _start_avatar(self, room: rtc.Room) -> None:
        settings = self.settings
        job_tokens = tokens.mint(
            settings,
            room=room.name,
            worker_identity=room.local_participant.identity,
            avatar_identity=self._identity,
            ttl=tokens.ttl_for(None, settings),
        )
        # Registered before the avatar exists, so no report of its first segment is missed.
        self._sender = AudioStreamSender(room, self._identity, self.server.sample_rate)
        self._client = http_avatar_client(self.server, settings)
        # A worker's idle session of this avatar in the room leaves first, as for a worker's
        # cold start: its late removal by identity would otherwise take this avatar out.
        assert self._redis is not None
        key = LinkKey(room.name, self._identity, self.server.name, self.server.sample_rate)
        await WarmPool(self._redis).make_room(key)
        stale = rooms.session_of(room, self._identity)
        try:
            session = await self._client.start(
                livekit_url=settings.livekit_url,
                livekit_token=job_tokens.avatar,
                avatar_id=self.avatar_id,
                avatar_identity=self._identity,
            )
        except AvatarOverLimit:
            if self._quota is not None:
                await self._quota.shrink()  # the server's real limit is lower than ours
            raise
        self.server_session = session
        self._identity = session.participant_identity
        self._sender.avatar_identity = self._identity
        join_timeout = settings.avatar_join_timeout_s
        if not session.acknowledged:
            join_timeout += START_ANSWER_TIMEOUT_S
        await rooms.wait_until_ready(
            room,
            self._identity,
            join_timeout=join_timeout,
            listen_timeout=settings.avatar_join_timeout_s,
            not_sid=stale,
        )

    async def aclose(self) -> None:
        """Stop the speech, the avatar session (or make the avatar leave) and give the slot
        back; only then let the room go to the workers. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self.lane is not None:  # first: its playing job is handed back while the avatar is up
            await self.lane.stop()
        if self.audio_output is not None:
            await self.audio_output.aclose()
        if self._client is not None:
            if self.server_session is not None and not await self._client.stop(self.server_session):
                admin = RoomAdmin.of(self.settings)
                await rooms.remove_participant(
                    admin.url,
                    admin.api_key,
                    admin.api_secret,
                    room=self._room_name,
                    identity=self._identity,
                )
            await self._client.aclose()
        if self._sender is not None:
            await self._sender.aclose()
        if self._quota is not None and self._slot is not None:
            await self._quota.release(self._slot)
        if self._quota is not None:
            await self._quota.aclose()
        if self._redis is not None:
            await self._redis.aclose()
        if self.server_session is None:
            # No avatar of ours ever joined. In a job, the base class would remove whoever
            # has the identity: the avatar of the job or the agent that holds the room.
            # (`_room` is livekit-agents' own; pinned below 1.9, tests/test_agents.py.)
            self._room = None
        await super().aclose()
        if self.lane is not None:  # the avatar is gone: the room's jobs go to the workers
            await self.lane.leave()


def _configured_server(settings: Settings, name_or_url: str | None) -> AvatarServer:
    if name_or_url is None or "://" not in name_or_url:
        return settings.avatar_server(name_or_url)
    wanted = name_or_url.rstrip("/")
    for name, server in settings.configured_avatar_servers().items():
        if server.base_url == wanted:
            return settings.avatar_server(name)
    raise KeyError(f"no configured avatar server has the URL {name_or_url!r}")
