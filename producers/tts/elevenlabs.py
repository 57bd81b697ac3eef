"""ElevenLabs speech: `POST /v1/text-to-speech/{voice_id}?output_format=…` with `xi-api-key`.

Errors follow ElevenLabs' documented shape `{"detail": {"status", "message"}}` (newer replies
add `code`, `type`, `request_id`); request validation failures are FastAPI's 422
`{"detail": [{"loc", "msg", "type"}]}`. `quota_exceeded` comes as a 401 and is permanent like
`invalid_api_key`; 429 (`too_many_concurrent_requests`, `system_busy`) and 5xx are transient;
any other 4xx (`voice_not_found`, `max_character_limit_exceeded`) is permanent.
SSML documents are not accepted by this endpoint, so `ssml=True` is refused before calling.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from avatarq.settings import Settings
from producers.tts.base import (
    HttpReply,
    Speech,
    body_excerpt,
    expect_audio,
    http_failure,
    post_json,
    redact,
)

#: "Rachel", one of the premade voices every account has.
DEFAULT_VOICE = "21m00Tcm4TlvDq8ikWAM"
#: Available on every plan (higher bitrates and PCM need paid tiers).
OUTPUT_FORMAT = "mp3_44100_128"


class ElevenLabsEngine:
    name = "elevenlabs"
    supports_ssml = False

    def __init__(self, settings: Settings) -> None:
        self.base = settings.elevenlabs_url.rstrip("/")
        self.model = settings.elevenlabs_model
        self._key = settings.elevenlabs_api_key.get_secret_value()
        self.timeout = settings.tts_timeout_s

    @property
    def cache_identity(self) -> str:
        return f"{self.name}:{self.model}:{OUTPUT_FORMAT}"

    def synthesize(self, text: str, voice: str | None, language: str | None, ssml: bool) -> Speech:
        voice_id = quote(voice or DEFAULT_VOICE, safe="")
        url = f"{self.base}/v1/text-to-speech/{voice_id}?output_format={OUTPUT_FORMAT}"
        payload: dict[str, Any] = {"text": text, "model_id": self.model}
        if language:
            # ISO 639-1: ElevenLabs wants `de`, not `de-DE`.
            payload["language_code"] = language.split("-")[0].lower()
        headers = {"xi-api-key": self._key, "Accept": "audio/mpeg"}
        reply = post_json(url, payload, headers, timeout=self.timeout, engine=self.name)
        if reply.status != 200:
            raise self._failure(reply)
        expect_audio(reply, self.name)
        return Speech(reply.body, reply.content_type, "mp3")

    def _failure(self, reply: HttpReply) -> Exception:
        body = reply.json()
        detail = body.get("detail") if isinstance(body, dict) else None
        status = ""
        if isinstance(detail, dict):
            status = str(detail.get("code") or detail.get("status") or "")
            message = f"{status}: {detail.get('message', '')}" if status else str(detail)
        elif isinstance(detail, list):
            message = "; ".join(
                f"{'.'.join(map(str, d.get('loc', [])))}: {d.get('msg', '')}"
                for d in detail
                if isinstance(d, dict)
            )
        else:
            message = body_excerpt(reply)
        return http_failure(
            self.name, reply, redact(message, self._key), out_of_quota=status == "quota_exceeded"
        )
