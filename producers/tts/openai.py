"""OpenAI-compatible speech: `POST {base}/v1/audio/speech`, which OpenAI and many self-hosted
servers (Kokoro-FastAPI, LocalAI, openedai-speech, …) speak.

429 is transient unless its code is `insufficient_quota` (retrying adds no credit), 5xx is
transient, any other 4xx permanent (the error shape: docs/compatibility.md). `language` is
not sent (OpenAI infers it from the text); SSML is not supported."""

from __future__ import annotations

from typing import Any

from avatarq.settings import Settings
from producers.tts.http import HttpEngine, HttpRequest

DEFAULT_VOICE = "alloy"


class OpenAiEngine(HttpEngine):
    name = "openai"
    #: mp3 keeps stored files small; every OpenAI-compatible server supports it.
    extension = "mp3"

    def __init__(self, settings: Settings) -> None:
        super().__init__(
            key=settings.openai_api_key.get_secret_value(),
            model=settings.openai_tts_model,
            timeout=settings.tts_timeout_s,
        )
        base = settings.openai_tts_url.rstrip("/").removesuffix("/v1")
        self.url = f"{base}/v1/audio/speech"

    def _request(self, text: str, voice: str | None, language: str | None) -> HttpRequest:
        payload = {
            "model": self.model,
            "input": text,
            "voice": voice or DEFAULT_VOICE,
            "response_format": self.extension,
        }
        # Self-hosted servers often need no key; sending an empty Bearer would be refused.
        headers = {"Authorization": f"Bearer {self._key}"} if self._key else {}
        return HttpRequest(self.url, payload, headers)

    def _error(self, body: Any) -> tuple[str, bool] | None:
        error = body.get("error") if isinstance(body, dict) else None
        if not isinstance(error, dict) or not error.get("message"):
            return None
        quota = "insufficient_quota" in (error.get("code"), error.get("type"))
        return str(error["message"]), quota
