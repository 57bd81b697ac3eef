"""The engine interface, its two failure kinds, and the HTTP call hosted engines share."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any, Protocol

from avatarq.errors import PermanentJobError, TransientJobError


class TtsRejected(PermanentJobError):
    """The engine refused the request (bad voice, auth, quota, 4xx): retrying cannot help."""

    reason = "tts_rejected"


class TtsUnavailable(TransientJobError):
    """The engine could not answer (5xx, rate limit, timeout, connection): retried."""

    reason = "tts_unavailable"


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


@dataclass(frozen=True)
class HttpReply:
    status: int
    content_type: str
    body: bytes

    def json(self) -> Any:
        try:
            return json.loads(self.body)
        except ValueError:
            return None


def post_json(
    url: str, payload: dict[str, Any], headers: dict[str, str], *, timeout: float, engine: str
) -> HttpReply:
    """POST JSON and return the reply whatever its status; network failures are transient."""
    request = urllib.request.Request(
        url,
        data=json.dumps(payload).encode(),
        headers={"Content-Type": "application/json", **headers},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return HttpReply(response.status, response.headers.get_content_type(), response.read())
    except urllib.error.HTTPError as e:
        with e:
            return HttpReply(e.code, e.headers.get_content_type(), e.read())
    except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
        # URLError's text names the host, never the headers that carry the key.
        raise TtsUnavailable(f"{engine}: cannot reach {url}: {e}") from None


def expect_audio(reply: HttpReply, engine: str) -> None:
    """A 200 that is not audio (a proxy's HTML page, a JSON error) is not speech."""
    if not reply.content_type.startswith("audio/") or not reply.body:
        raise TtsUnavailable(
            f"{engine}: HTTP {reply.status} returned {reply.content_type or 'no content type'} "
            f"({len(reply.body)} bytes), not audio"
        )


def redact(message: str, secret: str) -> str:
    """Engines may echo the key back (self-hosted servers do): never let it reach a result."""
    return message.replace(secret, "***") if secret else message


def http_failure(
    engine: str, reply: HttpReply, message: str, *, out_of_quota: bool = False
) -> TtsRejected | TtsUnavailable:
    """The error for a non-2xx reply: 5xx and rate limits pass; other 4xx and quota do not."""
    text = f"{engine}: HTTP {reply.status}: {message}"
    if reply.status >= 500 or (reply.status in (408, 429) and not out_of_quota):
        return TtsUnavailable(text)
    return TtsRejected(text)


def body_excerpt(reply: HttpReply, limit: int = 300) -> str:
    """For error bodies that are not the provider's JSON (a proxy's page): a short excerpt."""
    return reply.body[:limit].decode("utf-8", "replace").strip() or "(empty body)"
