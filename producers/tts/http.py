"""What the hosted engines share: one JSON POST over urllib, the audio check, and turning a
non-2xx reply into TtsRejected or TtsUnavailable with the provider's message and no secret.

A provider module only states its request (`_request`) and how its error bodies read
(`_error`); the flow and the retry semantics live here once.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

from producers.tts.base import Speech, TtsRejected, TtsUnavailable


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

    def excerpt(self, limit: int = 300) -> str:
        """For error bodies that are not the provider's JSON (a proxy's page)."""
        return self.body[:limit].decode("utf-8", "replace").strip() or "(empty body)"


@dataclass(frozen=True)
class HttpRequest:
    url: str
    payload: dict[str, Any]
    headers: dict[str, str]


class HttpEngine:
    """Base of the hosted engines. Subclasses set the class attributes and the two hooks."""

    name: str
    supports_ssml = False
    #: Stored file extension of what the provider returns.
    extension: str

    def __init__(self, *, key: str, model: str, timeout: float) -> None:
        self._key, self.model, self.timeout = key, model, timeout

    @property
    def cache_identity(self) -> str:
        return f"{self.name}:{self.model}:{self.extension}"

    def _request(self, text: str, voice: str | None, language: str | None) -> HttpRequest:
        raise NotImplementedError

    def _error(self, body: Any) -> tuple[str, bool] | None:
        """(message, out_of_quota) from the provider's error body; None if not its shape."""
        raise NotImplementedError

    def synthesize(self, text: str, voice: str | None, language: str | None, ssml: bool) -> Speech:
        request = self._request(text, voice, language)
        reply = self._post(request)
        if reply.status != 200:
            raise self._failure(reply)
        # A 200 that is not audio (a proxy's HTML page, a JSON error) is not speech.
        if not reply.content_type.startswith("audio/") or not reply.body:
            raise TtsUnavailable(
                f"{self.name}: HTTP 200 returned {reply.content_type or 'no content type'} "
                f"({len(reply.body)} bytes), not audio"
            )
        return Speech(reply.body, reply.content_type, self.extension)

    def _post(self, request: HttpRequest) -> HttpReply:
        """POST JSON and return the reply whatever its status; network failures are transient."""
        http_request = urllib.request.Request(
            request.url,
            data=json.dumps(request.payload).encode(),
            headers={"Content-Type": "application/json", **request.headers},
            method="POST",
        )
        try:
            with urllib.request.urlopen(http_request, timeout=self.timeout) as response:
                return HttpReply(
                    response.status, response.headers.get_content_type(), response.read()
                )
        except urllib.error.HTTPError as e:
            with e:
                return HttpReply(e.code, e.headers.get_content_type(), e.read())
        except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
            # URLError's text names the host, never the headers that carry the key.
            raise TtsUnavailable(f"{self.name}: cannot reach {request.url}: {e}") from None

    def _failure(self, reply: HttpReply) -> TtsRejected | TtsUnavailable:
        """5xx and rate limits pass (transient); other 4xx and an exhausted quota do not."""
        parsed = self._error(reply.json())
        message, out_of_quota = parsed if parsed else (reply.excerpt(), False)
        # Engines may echo the key back (self-hosted servers do): never let it reach a result.
        if self._key:
            message = message.replace(self._key, "***")
        text = f"{self.name}: HTTP {reply.status}: {message}"
        if reply.status >= 500 or (reply.status in (408, 429) and not out_of_quota):
            return TtsUnavailable(text)
        return TtsRejected(text)
