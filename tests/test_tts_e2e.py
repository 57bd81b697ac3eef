"""A TTS job end to end on the local stack: espeak-ng renders on the producer side, a real
Celery worker plays the stored audio to the avatar emulator in a LiveKit room. Runs inside
the private network namespace (`infra/netns-run`)."""

from __future__ import annotations

import wave
from collections.abc import Iterator
from pathlib import Path

import pytest

from avatarq.settings import get_settings
from avatarq_dev.stack import LocalStack
from tests.netns import NETNS
from tests.test_pipeline_e2e import reference_pcm, run_job, stack

__all__ = ["stack"]  # the local stack fixture, used by name below

pytestmark = NETNS


@pytest.fixture
def tts_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A private render cache for this test's producer (the worker only reads the path)."""
    monkeypatch.setenv("AVATARQ_TTS_CACHE_DIR", str(tmp_path / "tts"))
    get_settings.cache_clear()
    yield tmp_path / "tts"
    monkeypatch.undo()
    get_settings.cache_clear()


def test_say_renders_with_espeak_and_the_avatar_plays_it(
    stack: LocalStack, tts_cache: Path
) -> None:
    text = "Good morning. The avatar queue speaks."
    result = run_job(stack, source={"type": "tts", "text": text, "voice": "en-us"})
    assert result["status"] == "completed", result
    meta = result["metadata"]["tts"]
    assert meta["engine"] == "espeak" and meta["preview"] == text

    [rendered] = tts_cache.glob(f"*/{meta['sha256']}.wav")
    expected = reference_pcm(rendered, 16000)
    wav_path = stack.recordings / f"{result['avatar_session_id']}.wav"
    with wave.open(str(wav_path)) as w:
        assert w.getframerate() == 16000
        received = w.readframes(w.getnframes())
    # The avatar got the whole rendered speech: same length as ffmpeg's decode of it.
    assert len(received) > 16000 and len(received) == len(expected)
    assert result["seconds_streamed"] == pytest.approx(len(expected) / 32000, abs=1e-3)
