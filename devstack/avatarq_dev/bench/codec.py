"""Section 4: decode + resample speed of the worker's PcmDecoder, per input format.

Baseline: the same ffmpeg decoding the same file to nowhere (`-f null`, no resampling, no
pipe), i.e. what the codec alone costs; the ratio shows what our pipe and resampling add.
"""

from __future__ import annotations

import asyncio
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

from avatarq.settings import Settings
from avatarq_dev.bench.stats import CODECS, make_clip, ratio
from tasks.toolkit import CHUNK_SECONDS, PcmDecoder, aresolve, ffmpeg_binary

#: The worker's default rate and chunk: what a job really reads.
RATE = 16000
CHUNK_BYTES = int(RATE * CHUNK_SECONDS) * 2


async def _decode_seconds(path: Path, settings: Settings) -> tuple[float, int]:
    resolved = await aresolve(str(path), settings)
    start = time.perf_counter()
    async with PcmDecoder(resolved, sample_rate=RATE, settings=settings) as decoder:
        async for _ in decoder.chunks(CHUNK_BYTES):
            pass
    return time.perf_counter() - start, decoder.bytes_read


async def _start_seconds(path: Path, settings: Settings) -> dict[str, float]:
    """What play() does before it touches a room (or a kept link): resolve the source, start
    the decoder, read the first chunk and the declared length (ffmpeg)."""
    t0 = time.perf_counter()
    resolved = await aresolve(str(path), settings)
    t1 = time.perf_counter()
    async with PcmDecoder(resolved, sample_rate=RATE, settings=settings) as decoder:
        await anext(decoder.chunks(CHUNK_BYTES))
        await decoder.declared_seconds()
        t2 = time.perf_counter()
    return {"resolve_s": t1 - t0, "first_chunk_s": t2 - t1}


def bench_job_start(workdir: Path, runs: int = 5) -> dict[str, Any]:
    """p50 of each step a warm job takes before its first byte, on a short WAV."""
    settings = Settings()
    clip = make_clip(workdir / "start.wav", 2.0, rate=RATE)
    samples = [asyncio.run(_start_seconds(clip, settings)) for _ in range(runs)]
    return {
        key: round(statistics.median(s[key] for s in samples), 4)
        for key in ("resolve_s", "first_chunk_s")
    }


def _null_decode_seconds(path: Path, settings: Settings) -> float:
    argv = [ffmpeg_binary(settings), "-nostdin", "-loglevel", "error", "-i", str(path)]
    start = time.perf_counter()
    subprocess.run([*argv, "-f", "null", "-"], check=True, timeout=120, capture_output=True)
    return time.perf_counter() - start


def bench_decode(workdir: Path, seconds: float) -> dict[str, Any]:
    """x real time per format (best of 3 runs: the machine is shared)."""
    settings = Settings()
    formats: dict[str, Any] = {}
    for suffix in CODECS:
        clip = make_clip(workdir / f"decode.{suffix}", seconds)
        runs = [asyncio.run(_decode_seconds(clip, settings)) for _ in range(3)]
        elapsed = min(r[0] for r in runs)
        audio_s = runs[0][1] / (RATE * 2)
        null_s = min(_null_decode_seconds(clip, settings) for _ in range(3))
        ours = audio_s / elapsed
        formats[suffix] = {
            "x_realtime": round(ours, 1),
            "baseline_ffmpeg_null_x_realtime": round(audio_s / null_s, 1),
            "ratio_vs_baseline": ratio(ours, audio_s / null_s),
        }
    slowest = min(formats, key=lambda k: formats[k]["x_realtime"])
    return {
        "decode_x_realtime": formats[slowest]["x_realtime"],
        "decode": {
            "job_start_p50": bench_job_start(workdir),
            "clip_seconds": seconds,
            "slowest_format": slowest,
            "slowest_baseline_x_realtime": formats[slowest]["baseline_ffmpeg_null_x_realtime"],
            "formats": formats,
        },
    }
