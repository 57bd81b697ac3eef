"""Make test audio with the real ffmpeg: tones and chirps in the formats jobs arrive in.

Files are generated (never checked in) so every test states exactly what it decodes: sample
rate, duration and codec. Expected sample counts follow from those.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from avatarq.settings import Settings
from tasks.decode import ffmpeg_binary

# Encoder options per container. Opus only runs at 48 kHz internally; mp3/aac keep the rate.
CODECS: dict[str, list[str]] = {
    "wav": ["-c:a", "pcm_s16le"],
    "mp3": ["-c:a", "libmp3lame", "-b:a", "64k"],
    "m4a": ["-c:a", "aac", "-b:a", "64k"],
    "ogg": ["-c:a", "libopus", "-b:a", "32k"],
}


#: The ffmpeg command line every generator starts with.
FFMPEG_ARGS = [ffmpeg_binary(Settings()), "-nostdin", "-hide_banner", "-loglevel", "error", "-y"]


def _ffmpeg(*args: str) -> None:
    subprocess.run([*FFMPEG_ARGS, *args], check=True, timeout=120, capture_output=True)


def tone(
    path: Path, *, seconds: float, rate: int = 16000, freq: float = 440.0, channels: int = 1
) -> Path:
    """A sine tone encoded by the container implied by `path`'s suffix (see CODECS)."""
    codec = CODECS[path.suffix.lstrip(".")]
    _ffmpeg(
        "-f",
        "lavfi",
        "-i",
        f"sine=frequency={freq}:sample_rate={rate}:duration={seconds}",
        "-ac",
        str(channels),
        *codec,
        str(path),
    )
    return path


def chirp(path: Path, *, seconds: float, rate: int = 16000) -> Path:
    """A rising sweep 100 Hz → 4 kHz: every sample differs, so misalignment shows."""
    codec = CODECS[path.suffix.lstrip(".")]
    # aevalsrc's expression is the phase integral of a linear sweep.
    f0, f1 = 100.0, 4000.0
    expr = f"0.5*sin(2*PI*({f0}*t+({f1}-{f0})/(2*{seconds})*t*t))"
    _ffmpeg(
        "-f", "lavfi", "-i", f"aevalsrc={expr}:s={rate}:d={seconds}", "-ac", "1", *codec, str(path)
    )
    return path


def remux_ts(source: Path, path: Path) -> Path:
    """`source`'s audio copied into MPEG-TS, the segment format HLS playlists reference."""
    _ffmpeg("-i", str(source), "-map", "0:a:0", "-c", "copy", "-f", "mpegts", str(path))
    return path


def image(path: Path) -> Path:
    """A real media file without audio (a PNG): ffmpeg opens it but finds no audio stream."""
    _ffmpeg("-f", "lavfi", "-i", "color=c=red:s=32x32", "-frames:v", "1", str(path))
    return path


def text_file(path: Path) -> Path:
    """Not media at all."""
    path.write_text("this is a shopping list, not audio\n" * 50)
    return path


def corrupt(path: Path, *, source: Path) -> Path:
    """`source`'s first bytes with the rest replaced by noise: a container whose index is lost."""
    data = source.read_bytes()
    keep = min(len(data) // 4, 512)
    path.write_bytes(data[:keep] + os.urandom(len(data) - keep))
    return path


def wav_samples(path: Path) -> bytes:
    """The PCM payload of a canonical s16le WAV written by ffmpeg (data chunk only)."""
    data = path.read_bytes()
    idx = data.index(b"data")
    size = int.from_bytes(data[idx + 4 : idx + 8], "little")
    return data[idx + 8 : idx + 8 + size]
