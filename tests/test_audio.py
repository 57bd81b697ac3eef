"""A job's audio opened by ffmpeg, and the next job of a room made ready ahead of its turn:
real ffmpeg, real files."""

from __future__ import annotations

import asyncio
from pathlib import Path

import psutil
import pytest

from avatarq.errors import SourceNotFound
from avatarq.jobs import parse_job
from avatarq.settings import Settings
from tasks import audio as audio_mod
from tasks.audio import FfmpegAudio
from tasks.seams import AudioSpec
from tests import audio

SETTINGS = Settings(allow_private_sources=True)
SPEC = AudioSpec(max_seconds=60.0, sample_rate=16000, chunk_bytes=12800)


def _job(source: Path | str, job_id: str = "job-1") -> object:
    payload = {"job_id": job_id, "room": "r", "avatar_id": "a", "source": str(source)}
    return parse_job(payload, SETTINGS)


def _decoders() -> int:
    return sum(1 for c in psutil.Process().children(recursive=True) if "ffmpeg" in c.name())


async def _read(opener: FfmpegAudio, job: object, chunks: int = 10**6) -> bytes:
    async with opener.open(job, SPEC) as a:  # type: ignore[arg-type]
        out = [a.first]
        async for chunk in a.rest:
            if len(out) == chunks:
                break
            out.append(chunk)
        return b"".join(out)


def test_a_prepared_source_is_taken_over_by_its_open(tmp_path: Path) -> None:
    # Longer than the decoder runs ahead (RUN_AHEAD_S), so its ffmpeg is still there.
    clip = audio.chirp(tmp_path / "c.wav", seconds=120.0)

    async def go() -> tuple[bytes, bytes, int]:
        opener = FfmpegAudio(SETTINGS)
        plain = await _read(opener, _job(clip, "plain"), chunks=5)
        opener.prepare(_job(clip), SPEC)  # type: ignore[arg-type]
        await asyncio.sleep(0.5)
        running = _decoders()  # started ahead of its open
        prepared = await _read(opener, _job(clip), chunks=5)
        return plain, prepared, running

    plain, prepared, running = asyncio.run(go())
    assert running == 1
    assert prepared == plain and len(prepared) == 5 * SPEC.chunk_bytes
    assert _decoders() == 0  # the open that took it over closed it


def test_an_unopened_prepared_source_is_closed_after_a_while(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(audio_mod, "PREPARED_TTL_S", 0.3)  # the default waits 15 s
    clip = audio.chirp(tmp_path / "c.wav", seconds=120.0)

    async def go() -> tuple[int, int]:
        opener = FfmpegAudio(SETTINGS)
        opener.prepare(_job(clip), SPEC)  # type: ignore[arg-type]
        await asyncio.sleep(0.2)
        before = _decoders()
        await asyncio.sleep(1.0)
        return before, _decoders()

    before, after = asyncio.run(go())
    assert before >= 1 and after == 0


def test_a_prepared_sources_error_is_its_jobs_at_open(tmp_path: Path) -> None:
    async def go() -> None:
        opener = FfmpegAudio(SETTINGS)
        job = _job(tmp_path / "missing.wav")
        opener.prepare(job, SPEC)  # type: ignore[arg-type]
        await asyncio.sleep(0.2)
        with pytest.raises(SourceNotFound):
            await _read(opener, job)

    asyncio.run(go())
