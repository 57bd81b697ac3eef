"""ElevenLabs speech: `POST /v1/text-to-speech/{voice_id}?output_format=…` with `xi-api-key`.

A spent quota (a 401) is permanent like a bad key; 429 and 5xx are transient, any other 4xx
permanent (the error shapes: docs/compatibility.md). The endpoint takes no SSML, so
`ssml=True` is refused before calling."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from avatarq.settings import Settings
from producers.tts.http import HttpEngine, HttpRequest

#: "Rachel", one of the premade voices every account has.
DEFAULT_VOICE = "21m00Tcm4TlvDq8ikWAM"
#: Available on every plan (higher bitrates and PCM need paid tiers).
OUTPUT_FORMAT = "mp3_44100_128"


class ElevenLabsEngine(HttpEngine):
    name = "elevenlabs"
    extension = "mp3"

    def __init__(self, settings: Settings) -> None:
        super().__init__(
            key=settings.elevenlabs_api_key.get_secret_value(),
            model=settings.elevenlabs_model,
            timeout=settings.tts_timeout_s,
        )
        self.base = settings.elevenlabs_url.rstrip("/")

    def _request(self, text: str, voice: str | None, language: str | None) -> HttpRequest:
        voice_id = quote(voice or DEFAULT_VOICE, safe="")
        url = f"{self.base}/v1/text-to-speech/{voice_id}?output_format={OUTPUT_FORMAT}"
        payload: dict[str, Any] = {"text": text, "model_id": self.model}
        if language:
            # ISO 639-1: ElevenLabs wants `de`, not `de-DE`.
            payload["language_code"] = language.split("-")[0].lower()
        return HttpRequest(url, payload, {"xi-api-key": self._key, "Accept": "audio/mpeg"})

    def _error(self, body: Any) -> tuple[str, bool] | None:
        detail = body.get("detail") if isinstance(body, dict) else None
        if isinstance(detail, dict):
            status = str(detail.get("code") or detail.get("status") or "")
            message = f"{status}: {detail.get('message', '')}" if status else str(detail)
            return message, status == "quota_exceeded"
        if isinstance(detail, list):
            problems = (
                f"{'.'.join(map(str, d.get('loc', [])))}: {d.get('msg', '')}"
                for d in detail
                if isinstance(d, dict)
            )
            return "; ".join(problems), False
        return None
