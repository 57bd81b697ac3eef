"""The engine interface and its two failure kinds."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from avatarq.errors import PermanentJobError, Reason, TransientJobError


class TtsRejected(PermanentJobError):
    """The engine refused the request (bad voice, auth, quota, 4xx): retrying cannot help."""

    reason = Reason.TTS_REJECTED


class TtsUnavailable(TransientJobError):
    """The engine could not answer (5xx, rate limit, timeout, connection): retried."""

    reason = Reason.TTS_UNAVAILABLE


@dataclass(frozen=True)
class Speech:
    """Rendered audio and how to store it."""

    audio: bytes
    content_type: str
    extension: str


class TtsEngine(Protocol):
    #: Engine name as written in a job's `tts` source.
    name: str
    #: Whether `ssml=True` text is understood; render refuses SSML for engines without it.
    supports_ssml: bool

    @property
    def cache_identity(self) -> str:
        """Everything besides the request that changes the audio (engine, model, format)."""
        ...

    def synthesize(self, text: str, voice: str | None, language: str | None, ssml: bool) -> Speech:
        """Render `text`; raises TtsRejected or TtsUnavailable with the engine's message."""
        ...
