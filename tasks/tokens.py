"""LiveKit access tokens for one job: each carries only the grants it needs, for one room.

The secret comes from settings (the environment), never from the job payload.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from livekit import api

from avatarq.settings import Settings

#: Attribute that lets the avatar publish its media on behalf of the sending agent
#: (livekit.agents.types.ATTRIBUTE_PUBLISH_ON_BEHALF).
ATTRIBUTE_PUBLISH_ON_BEHALF = "lk.publish_on_behalf"
#: Minimum token lifetime: joining and avatar start take a while even for a short clip.
MIN_TTL_S = 300.0


@dataclass(frozen=True)
class JobTokens:
    worker: str
    avatar: str
    #: The room keeper (tasks/room.py): hidden, and allowed nothing but being there.
    keeper: str


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
    key, secret = settings.livekit_api_key, settings.livekit_api_secret.get_secret_value()
    worker = (
        api.AccessToken(key, secret)
        .with_identity(worker_identity)
        .with_name("avatarq")
        .with_kind("agent")
        .with_ttl(ttl)
        # The worker only sends data (the audio stream and RPCs); it publishes no media.
        .with_grants(
            api.VideoGrants(
                room_join=True,
                room=room,
                can_publish=False,
                can_publish_data=True,
                can_subscribe=True,
            )
        )
        .to_jwt()
    )
    avatar = (
        api.AccessToken(key, secret)
        .with_identity(avatar_identity)
        .with_name(avatar_identity)
        .with_kind("agent")
        .with_ttl(ttl)
        .with_grants(api.VideoGrants(room_join=True, room=room))
        .with_attributes({ATTRIBUTE_PUBLISH_ON_BEHALF: worker_identity})
        .to_jwt()
    )
    keeper = (
        api.AccessToken(key, secret)
        .with_identity(keeper_identity(worker_identity))
        .with_kind("standard")
        .with_ttl(ttl)
        .with_grants(
            api.VideoGrants(
                room_join=True,
                room=room,
                hidden=True,
                can_publish=False,
                can_publish_data=False,
                can_subscribe=False,
            )
        )
        .to_jwt()
    )
    return JobTokens(worker=worker, avatar=avatar, keeper=keeper)
