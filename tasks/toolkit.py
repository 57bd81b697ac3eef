"""The worker's public surface for tooling: all the dev stack (`avatarq_dev`) may use of `tasks`
(an import contract in pyproject.toml, checked by tests/test_layers.py).

The bench measures the worker's own parts, so it gets them here under stable names while the
worker's modules move behind them; a change to a name in `__all__` changes the dev stack too."""

from __future__ import annotations

from tasks.app import quiet_livekit_logs
from tasks.compat import route_own_events
from tasks.decode import PcmDecoder, ffmpeg_binary
from tasks.link.avatar import HttpAvatarClient
from tasks.link.pacing import Pacer
from tasks.link.quota import AvatarQuota, Slot
from tasks.link.room import connect as connect_room
from tasks.link.room import wait_for_avatar
from tasks.link.stream import CHUNK_SECONDS, AudioStreamSender
from tasks.link.tokens import mint as mint_tokens
from tasks.link.tokens import ttl_for as token_ttl_for
from tasks.source import aresolve

__all__ = [
    # audio in: where a source is, its declared length, ffmpeg decoding it to PCM
    "aresolve",
    "ffmpeg_binary",
    "PcmDecoder",
    # audio out: the chunk size, the real-time pacer and the DataStream sender
    "CHUNK_SECONDS",
    "Pacer",
    "AudioStreamSender",
    # LiveKit and the avatar server, as a job meets them
    "connect_room",
    "wait_for_avatar",
    "mint_tokens",
    "token_ttl_for",
    "HttpAvatarClient",
    # the fleet-wide avatar session quota
    "AvatarQuota",
    "Slot",
    # the worker's LiveKit SDK settings, for a process that streams or hosts rooms as it does:
    # its logs, and each room given only its own FFI events
    "quiet_livekit_logs",
    "route_own_events",
]
