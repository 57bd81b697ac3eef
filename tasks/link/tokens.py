"""LiveKit access tokens for one job: each carries only the grants it needs, for one room.

The secret comes from settings (the environment), never from the job payload.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta

from livekit import api

from avatarq.settings import Settings

#: Attribute that lets the avatar publish its media on behalf of the sending agent
#: (livekit.agents.types.ATTRIBUTE_PUBLISH_ON_BEHALF).
ATTRIBUTE_PUBLISH_ON_BEHALF = "lk.publish_on_behalf"
#: Minimum token lifetime: joining and avatar start take a while even for a short clip.
MIN_TTL_S = 300.0


@dataclass(frozen=True)
class _Signer:
    """What every token of one job shares: the key pair and the lifetime."""

    key: str
    secret: str = field(repr=False)
    ttl: timedelta

    @classmethod
    def of(cls, settings: Settings, ttl: timedelta) -> _Signer:
        return cls(settings.livekit_api_key, settings.livekit_api_secret.get_secret_value(), ttl)

    def token(
        self,
        identity: str,
        kind: api.AccessToken.ParticipantKind,
        grants: api.VideoGrants,
        attributes: dict[str, str] | None = None,
        *,
        name: str | None = None,
    ) -> str:
        token = (
            api.AccessToken(self.key, self.secret)
            .with_identity(identity)
            .with_kind(kind)
            .with_ttl(self.ttl)
            .with_grants(grants)
        )
        if name is not None:
            token = token.with_name(name)
        if attributes:
            token = token.with_attributes(attributes)
        return token.to_jwt()


@dataclass(frozen=True)
class JobTokens:
    worker: str
    avatar: str
    room: str
    worker_identity: str
    _signer: _Signer = field(repr=False)

    @property
    def keeper(self) -> str:
        """The room keeper's token (tasks/link/room.py): hidden, and allowed nothing but being
        there. Signed only when asked for: a room held open by its own timeouts
        (tasks/link/roomhold.py) needs no keeper."""
        grants = api.VideoGrants(
            room_join=True,
            room=self.room,
            hidden=True,
            can_publish=False,
            can_publish_data=False,
            can_subscribe=False,
        )
        return self._signer.token(keeper_identity(self.worker_identity), "standard", grants)


def keeper_identity(worker_identity: str) -> str:
    return f"{worker_identity}-keeper"


def ttl_for(audio_seconds: float | None, settings: Settings) -> timedelta:
    """Long enough to join and play, short enough that a leaked token soon expires."""
    length = audio_seconds if audio_seconds is not None else settings.max_job_duration_s
    return timedelta(seconds=max(MIN_TTL_S, 2 * length + settings.avatar_join_timeout_s))


def mint(
    settings: Settings,
    *,
    room: str,
    worker_identity: str,
    avatar_identity: str,
    ttl: timedelta,
) -> JobTokens:
    signer = _Signer.of(settings, ttl)
    # The worker only sends data (the audio stream and RPCs) and never publishes a track, yet
    # its token may publish a microphone: livekit-server has a client with that right connect
    # its publisher transport as it joins, and a client without it waits ~150 ms longer for
    # its first subscription (the avatar's audio), on every avatar start (docs/protocol.md).
    worker_grants = api.VideoGrants(
        room_join=True,
        room=room,
        can_publish=True,
        can_publish_sources=["microphone"],
        can_publish_data=True,
        can_subscribe=True,
    )
    worker = signer.token(worker_identity, "agent", worker_grants, name="avatarq")
    avatar = signer.token(
        avatar_identity,
        "agent",
        api.VideoGrants(room_join=True, room=room),
        {ATTRIBUTE_PUBLISH_ON_BEHALF: worker_identity},
        name=avatar_identity,
    )
    return JobTokens(worker, avatar, room, worker_identity, signer)


def recorder_token(settings: Settings, *, room: str, identity: str, ttl: timedelta) -> str:
    """A recorder's token (tasks/recorder.py): hidden, subscribe only, one room."""
    signer = _Signer.of(settings, ttl)
    grants = api.VideoGrants(
        room_join=True,
        room=room,
        hidden=True,
        can_publish=False,
        can_publish_data=False,
        can_subscribe=True,
    )
    return signer.token(identity, "standard", grants)
