"""OpenAI-compatible speech: `POST {base}/v1/audio/speech`, which OpenAI and many self-hosted
servers (Kokoro-FastAPI, LocalAI, openedai-speech, …) speak.

Errors follow OpenAI's documented shape `{"error": {"message", "type", "param", "code"}}`:
429 is a rate limit (transient) unless its code is `insufficient_quota` (permanent: retrying
will not add credit); 5xx is transient; any other 4xx (bad key, bad voice) is permanent.
OpenAI infers the language from the text, so `language` is not sent; SSML is not supported.
"""

from __future__ import annotations

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

DEFAULT_VOICE = "alloy"
#: mp3 keeps stored files small; every OpenAI-compatible server supports it.
RESPONSE_FORMAT = "mp3"


class OpenAiEngine:
    name = "openai"
    supports_ssml = False

    def __init__(self, settings: Settings) -> None:
        base = settings.openai_tts_url.rstrip("/").removesuffix("/v1")
        self.url = f"{base}/v1/audio/speech"
        self.model = settings.openai_tts_model
        self._key = settings.openai_api_key.get_secret_value()
        self.timeout = settings.tts_timeout_s

    @property
    def cache_identity(self) -> str:
        return f"{self.name}:{self.model}:{RESPONSE_FORMAT}"

    def synthesize(self, text: str, voice: str | None, language: str | None, ssml: bool) -> Speech:
        payload = {
            "model": self.model,
            "input": text,
            "voice": voice or DEFAULT_VOICE,
            "response_format": RESPONSE_FORMAT,
        }
        # Self-hosted servers often need no key; sending an empty Bearer would be refused.
        headers = {"Authorization": f"Bearer {self._key}"} if self._key else {}
        reply = post_json(self.url, payload, headers, timeout=self.timeout, engine=self.name)
        if reply.status != 200:
            raise self._failure(reply)
        expect_audio(reply, self.name)
        return Speech(reply.body, reply.content_type, RESPONSE_FORMAT)

    def _failure(self, reply: HttpReply) -> Exception:
        body = reply.json()
        error = body.get("error") if isinstance(body, dict) else None
        if isinstance(error, dict) and error.get("message"):
            message = str(error["message"])
            quota = "insufficient_quota" in (error.get("code"), error.get("type"))
        else:
            message, quota = body_excerpt(reply), False
        return http_failure(self.name, reply, redact(message, self._key), out_of_quota=quota)
