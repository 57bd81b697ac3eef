"""Local stand-ins for hosted TTS APIs, faithful at the HTTP level (fakes of nothing else).

Each answers like the provider's documented API: same paths, auth headers, status codes,
content types and error bodies. Auth and voice checks are behaviour; faults the tests need
on demand (rate limits, quota, 5xx, validation errors) are queued with `fail_next`, and
their bodies are the documented ones below. `requests` records every call received.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from tests.httpserve import serving

OPENAI_KEY = "sk-test-openai-key"
ELEVEN_KEY = "xi-test-eleven-key"

OPENAI_VOICES = ("alloy", "ash", "ballad", "coral", "echo", "fable", "nova", "onyx", "sage")
ELEVEN_VOICES = ("21m00Tcm4TlvDq8ikWAM", "EXAVITQu4vr4xnSDxMaL")


def _openai_error(message: str, type_: str, code: str | None, param: str | None = None) -> Any:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


OPENAI_ERRORS: dict[str, tuple[int, Any]] = {
    "rate_limit": (
        429,
        _openai_error(
            "Rate limit reached for gpt-4o-mini-tts in organization org-test on requests per "
            "min (RPM): Limit 3, Used 3, Requested 1. Please try again in 20s.",
            "requests",
            "rate_limit_exceeded",
        ),
    ),
    "quota": (
        429,
        _openai_error(
            "You exceeded your current quota, please check your plan and billing details.",
            "insufficient_quota",
            "insufficient_quota",
        ),
    ),
    "server_error": (
        500,
        _openai_error(
            "The server had an error while processing your request. Sorry about that!",
            "server_error",
            None,
        ),
    ),
    "overloaded": (
        503,
        _openai_error(
            "The engine is currently overloaded, please try again later", "server_error", None
        ),
    ),
}

ELEVEN_ERRORS: dict[str, tuple[int, Any]] = {
    "quota": (
        401,
        {
            "detail": {
                "status": "quota_exceeded",
                "message": "This request exceeds your quota of 10000. You have 12 credits "
                "remaining, while 57 credits are required for this request.",
            }
        },
    ),
    "busy": (
        429,
        {
            "detail": {
                "status": "too_many_concurrent_requests",
                "message": "Too many concurrent requests. Your current subscription is "
                "associated with a maximum of 2 concurrent requests.",
            }
        },
    ),
    "validation": (
        422,
        {
            "detail": [
                {
                    "loc": ["body", "voice_settings", "stability"],
                    "msg": "ensure this value is less than or equal to 1.0",
                    "type": "value_error.number.not_le",
                }
            ]
        },
    ),
    "server_error": (
        500,
        {"detail": {"status": "internal_server_error", "message": "Internal server error"}},
    ),
}


@dataclass
class FakeTts:
    url: str
    audio: bytes
    requests: list[dict[str, Any]] = field(default_factory=list)
    queued: list[tuple[int, Any]] = field(default_factory=list)

    def fail_next(self, *faults: tuple[int, Any]) -> None:
        self.queued.extend(faults)

    def synth_calls(self) -> int:
        return len(self.requests)


class _Handler(BaseHTTPRequestHandler):
    fake: FakeTts

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass  # keep pytest output clean

    def _reply(self, status: int, body: bytes | Any, content_type: str) -> None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _headers(self) -> dict[str, str]:
        # Header names are case-insensitive (urllib sends `Xi-api-key`): record them lowered.
        return {k.lower(): v for k, v in self.headers.items()}

    def _read_json(self) -> Any:
        raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        return json.loads(raw or b"null")

    def _fault(self) -> bool:
        if not self.fake.queued:
            return False
        status, body = self.fake.queued.pop(0)
        self._reply(status, body, "application/json")
        return True


class _OpenAiHandler(_Handler):
    def do_POST(self) -> None:  # noqa: N802 - stdlib naming
        if urlsplit(self.path).path != "/v1/audio/speech":
            err = _openai_error(f"Invalid URL (POST {self.path})", "invalid_request_error", None)
            return self._reply(404, err, "application/json")
        body = self._read_json()
        self.fake.requests.append({"headers": self._headers(), "json": body})
        if self.headers.get("Authorization") != f"Bearer {OPENAI_KEY}":
            given = (self.headers.get("Authorization") or "").removeprefix("Bearer ")
            # OpenAI echoes a masked key; self-hosted servers may echo it whole (tests redaction).
            err = _openai_error(
                f"Incorrect API key provided: {given}. You can find your API key at "
                "https://platform.openai.com/account/api-keys.",
                "invalid_request_error",
                "invalid_api_key",
            )
            return self._reply(401, err, "application/json")
        if self._fault():
            return None
        if body.get("voice") not in OPENAI_VOICES:
            supported = ", ".join(f"'{v}'" for v in OPENAI_VOICES)
            err = _openai_error(
                f"Invalid value: '{body.get('voice')}'. Supported values are: {supported}.",
                "invalid_request_error",
                "invalid_value",
                "voice",
            )
            return self._reply(400, err, "application/json")
        return self._reply(200, self.fake.audio, "audio/mpeg")


class _ElevenHandler(_Handler):
    def do_POST(self) -> None:  # noqa: N802 - stdlib naming
        parts = urlsplit(self.path)
        prefix = "/v1/text-to-speech/"
        if not parts.path.startswith(prefix):
            return self._reply(404, {"detail": "Not Found"}, "application/json")
        voice_id = unquote(parts.path.removeprefix(prefix))
        body = self._read_json()
        self.fake.requests.append(
            {"headers": self._headers(), "json": body, "query": parse_qs(parts.query)}
        )
        if self.headers.get("xi-api-key") != ELEVEN_KEY:
            err = {"detail": {"status": "invalid_api_key", "message": "Invalid API key"}}
            return self._reply(401, err, "application/json")
        if self._fault():
            return None
        if voice_id not in ELEVEN_VOICES:
            err = {
                "detail": {
                    "status": "voice_not_found",
                    "message": f"A voice with the voice_id {voice_id} was not found.",
                }
            }
            return self._reply(400, err, "application/json")
        return self._reply(200, self.fake.audio, "audio/mpeg")


def serve(handler: type[_Handler], audio: bytes) -> Iterator[FakeTts]:
    """Run a fake on a free loopback port for the duration of the generator."""
    fake = FakeTts("", audio)
    # A subclass per server, so two fakes of one provider never share state.
    server = ThreadingHTTPServer(("127.0.0.1", 0), type("Bound", (handler,), {"fake": fake}))
    with serving(server) as url:
        fake.url = url
        yield fake


def openai_server(audio: bytes) -> Iterator[FakeTts]:
    return serve(_OpenAiHandler, audio)


def elevenlabs_server(audio: bytes) -> Iterator[FakeTts]:
    return serve(_ElevenHandler, audio)
