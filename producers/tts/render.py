"""Render a job's `tts` source to stored audio (once per distinct request) before enqueue."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass

from avatarq.captions import plain_text
from avatarq.jobs import Job, TtsSource, parse_job
from avatarq.settings import Settings, get_settings
from producers.tts.base import Speech, TtsEngine, TtsRejected, TtsUnavailable
from producers.tts.cache import cache_key, store_for
from producers.tts.elevenlabs import ElevenLabsEngine
from producers.tts.espeak import EspeakEngine
from producers.tts.openai import OpenAiEngine

ENGINES: dict[str, Callable[[Settings], TtsEngine]] = {
    "espeak": EspeakEngine,
    "openai": OpenAiEngine,
    "elevenlabs": ElevenLabsEngine,
}
#: Characters of the text kept in `metadata["tts"]["preview"]`: metadata travels with every
#: event and result, so the full text (up to AVATARQ_TTS_MAX_CHARS) stays out of it.
PREVIEW_CHARS = 80


@dataclass(frozen=True)
class Rendered:
    source: str
    """Where the audio is stored, as a job source: an absolute path or `s3://bucket/key`."""
    key: str
    """The content hash (sha256 hex) the audio is stored under."""
    cached: bool


def render_tts(
    tts: TtsSource, settings: Settings | None = None, *, engine: TtsEngine | None = None
) -> Rendered:
    """Return the stored audio for `tts`, synthesizing it only if no earlier render exists."""
    s = settings or get_settings()
    engine = engine or ENGINES[tts.engine](s)
    if tts.ssml and not engine.supports_ssml:
        raise TtsRejected(f"{engine.name}: SSML is not supported by this engine; send plain text")
    key = cache_key(engine.cache_identity, tts.voice, tts.language, tts.text, tts.ssml)
    store = store_for(s)
    hit = store.find(key)
    if hit is not None:
        return Rendered(hit, key, cached=True)
    return Rendered(store.put(key, _synthesize(engine, tts, s)), key, cached=False)


def _synthesize(engine: TtsEngine, tts: TtsSource, s: Settings) -> Speech:
    """Bounded retries with full-jitter backoff for transient engine faults only."""
    for attempt in range(1, s.tts_attempts + 1):
        try:
            return engine.synthesize(tts.text, tts.voice, tts.language, tts.ssml)
        except TtsUnavailable as e:
            if attempt == s.tts_attempts:
                raise TtsUnavailable(f"{e.message} (gave up after {attempt} attempts)") from None
            time.sleep(random.uniform(0, min(s.retry_cap_s, s.retry_base_s * 2 ** (attempt - 1))))
    raise AssertionError("unreachable: tts_attempts >= 1")


def render_job(job: Job, settings: Settings | None = None) -> Job:
    """`job` with a `tts` source replaced by its stored audio; other jobs unchanged.

    The request is kept in `metadata["tts"]` without its full text: engine, voice, language,
    ssml, the text's length, a short preview and the content hash that names the audio. The
    text (SSML without its markup) is the job's transcript unless the job gives its own.
    """
    tts = job.source
    if not isinstance(tts, TtsSource):
        return job
    rendered = render_tts(tts, settings)
    preview = tts.text if len(tts.text) <= PREVIEW_CHARS else tts.text[: PREVIEW_CHARS - 1] + "…"
    request = tts.model_dump(exclude={"type", "text"}, exclude_none=True)
    request.update(chars=len(tts.text), preview=preview, sha256=rendered.key)
    metadata = {**job.metadata, "tts": request}
    transcript = job.transcript or (plain_text(tts.text) if tts.ssml else tts.text) or None
    payload = {**job.payload(), "source": rendered.source, "metadata": metadata}
    return parse_job({**payload, "transcript": transcript}, settings)
