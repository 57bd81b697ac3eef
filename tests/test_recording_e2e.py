"""Recorded jobs on the local stack (official server, avatar emulator, moto S3, real ffmpeg):
the MP4 holds the avatar's video and the job's audio for exactly the job's segment."""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import pytest

from avatarq.captions import parse_transcript
from avatarq.results import parse_result
from avatarq.settings import Settings
from avatarq_dev.stack import LocalStack, local_stack
from tasks.decode import ffmpeg_binary
from tests import audio
from tests.netns import NETNS
from tests.s3 import DUMMY_ENV, s3_client, s3_server
from tests.test_pipeline_e2e import reference_pcm
from tests.waiting import wait_terminal

pytestmark = NETNS
__all__ = ["s3_server"]  # a fixture used by name below

JOB_TIMEOUT_S = 90.0
BUCKET = "recordings"
RATE = 16000
#: The emulator's face colour (devstack/avatarq_dev/avatar_emulator/video.py), RGB.
FACE = (236, 196, 160)
#: The recorded job's captions: two cues inside its 4 s.
SRT = (
    "1\n00:00:00,200 --> 00:00:01,500\nHello there.\n\n"
    "2\n00:00:02,000 --> 00:00:03,800\nA second line.\n"
)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, s3_server: str) -> Iterator[LocalStack]:
    s3_client(s3_server).create_bucket(Bucket=BUCKET)
    with local_stack(tmp_path_factory.mktemp("stack")) as s:
        s3_env = {
            **DUMMY_ENV,
            "AWS_ENDPOINT_URL_S3": s3_server,
            "AVATARQ_RECORDING_BUCKETS": BUCKET,
            "AVATARQ_WARM_IDLE": "5",
        }
        s.start_worker("rec", concurrency=4, extra_env=s3_env)
        with s.current(s3_env):
            yield s


def enqueue(**job: Any) -> str:
    from producers import enqueue as send

    job.setdefault("room", f"rec-{uuid.uuid4().hex[:8]}")
    return send({"avatar_id": "anna", **job}).job_id


def ended(stack: LocalStack, *job_ids: str) -> list[dict[str, Any]]:
    tails = lambda: "\n".join(w.tail(80) for w in stack.workers)  # noqa: E731
    done = wait_terminal(*job_ids, timeout=JOB_TIMEOUT_S, context=tails)
    for status in done.values():
        parse_result(status)
    return [done[j] for j in job_ids]


def fetch(recording: dict[str, Any], s3_server: str, tmp_path: Path, field: str = "url") -> Path:
    """The recording's file (or its `captions_url`): downloaded from S3, or where a local one
    lies."""
    url = urlsplit(recording[field])
    if url.scheme == "file":
        return Path(url.path)
    path = tmp_path / PurePosixPath(url.path).name
    s3_client(s3_server).download_file(url.netloc, url.path.lstrip("/"), str(path))
    return path


def probe(path: Path) -> dict[str, Any]:
    argv = ["ffprobe", "-v", "error", "-count_frames", "-show_streams", "-show_format"]
    argv += ["-of", "json", str(path)]
    out = subprocess.run(argv, capture_output=True, check=True, timeout=60).stdout
    info: dict[str, Any] = json.loads(out)
    return info


def pcm_of(path: Path) -> np.ndarray:
    return np.frombuffer(reference_pcm(path, RATE), dtype=np.int16).astype(np.float64)


def best_correlation(recorded: np.ndarray, source: np.ndarray) -> tuple[float, float]:
    """The peak normalised cross-correlation of the two, and its lag (s, recorded later)."""
    n = len(recorded) + len(source)
    spectrum = np.fft.rfft(recorded, n) * np.conj(np.fft.rfft(source, n))
    corr = np.fft.irfft(spectrum, n)
    lag = int(np.argmax(corr))
    norm = float(np.linalg.norm(recorded) * np.linalg.norm(source)) or 1.0
    return float(corr[lag]) / norm, (lag if lag < len(recorded) else lag - n) / RATE


def windowed_correlation(
    recorded: np.ndarray, source: np.ndarray, lag_s: float, window_s: float = 0.25
) -> tuple[float, list[float]]:
    """The median, over the source's windows, of each window's best normalised correlation
    within 40 ms of `lag_s`, and those best lags (s): the media path (Opus, the jitter
    buffer) shifts the audio by a few ms here and there, which one global lag cannot follow."""
    width, slack = int(window_s * RATE), int(0.04 * RATE)
    scores, lags = [], []
    for start in range(0, len(source) - width + 1, width):
        piece = source[start : start + width]
        best, best_lag = 0.0, 0
        for shift in range(-slack, slack + 1, 4):
            at = start + round(lag_s * RATE) + shift
            if at < 0 or at + width > len(recorded):
                continue
            other = recorded[at : at + width]
            norm = float(np.linalg.norm(other) * np.linalg.norm(piece)) or 1.0
            score = float(np.dot(other, piece)) / norm
            if score > best:
                best, best_lag = score, at - start
        scores.append(best)
        lags.append(best_lag / RATE)
    return float(np.median(scores)), lags


def frame_at(path: Path, seconds: float) -> np.ndarray:
    argv = [ffmpeg_binary(Settings()), "-nostdin", "-loglevel", "error", "-ss", f"{seconds}"]
    argv += ["-i", str(path), "-frames:v", "1", "-f", "rawvideo", "-pix_fmt", "rgb24", "pipe:1"]
    raw = subprocess.run(argv, capture_output=True, check=True, timeout=60).stdout
    return np.frombuffer(raw, dtype=np.uint8).reshape(120, 160, 3)


def tone_energy(pcm: np.ndarray, freq: float) -> float:
    """The share of `pcm`'s energy within 20 Hz of `freq`."""
    spectrum = np.abs(np.fft.rfft(pcm)) ** 2
    freqs = np.fft.rfftfreq(len(pcm), 1 / RATE)
    total = float(spectrum.sum()) or 1.0
    return float(spectrum[np.abs(freqs - freq) < 20].sum()) / total


def test_recorded_job_is_an_mp4_of_the_avatar_with_the_jobs_audio(
    stack: LocalStack, s3_server: str, tmp_path: Path
) -> None:
    clip = audio.chirp(tmp_path / "clip.ogg", seconds=4.0, rate=24000)
    job_id = enqueue(source=str(clip), record=f"s3://{BUCKET}/jobs/", transcript=SRT)
    (result,) = ended(stack, job_id)
    assert result["status"] == "completed", result
    recording = result["recording"]
    assert recording["url"] == f"s3://{BUCKET}/jobs/{result['job_id']}/attempt-1.mp4"
    # Its captions beside it, a WebVTT file that reads back as the job's cues.
    assert recording["captions_url"] == f"s3://{BUCKET}/jobs/{result['job_id']}/attempt-1.vtt"
    vtt = fetch(recording, s3_server, tmp_path, "captions_url").read_text()
    assert parse_transcript(vtt).format == "webvtt"
    assert parse_transcript(vtt).cues(None) == parse_transcript(SRT).cues(None)
    assert recording["partial"] is False and recording["backend"] == "local", recording
    assert recording["error"] is None

    path = fetch(recording, s3_server, tmp_path)
    assert path.stat().st_size == recording["size"]
    info = probe(path)
    streams = {s["codec_type"]: s for s in info["streams"]}
    assert streams["video"]["codec_name"] == "h264" and streams["audio"]["codec_name"] == "aac"
    duration = float(info["format"]["duration"])
    assert duration == pytest.approx(result["audio_duration"], abs=0.2), (duration, result)
    assert recording["duration"] == pytest.approx(duration, abs=0.1)
    assert info["format"]["tags"]["comment"] == "complete"

    # The avatar's audio is the job's: it correlates with the source, and is not silence.
    recorded, source = pcm_of(path), pcm_of(clip)
    score, lag = best_correlation(recorded, source)
    median, lags = windowed_correlation(recorded, source, lag)
    print(f"correlation {score:.3f} at {lag * 1000:.0f} ms; per 0.25 s window: median {median:.3f}"
          f", lags {min(lags) * 1000:.0f}..{max(lags) * 1000:.0f} ms")  # fmt: skip
    assert abs(lag) < 0.2 and median > 0.6, (score, lag, median)
    # In sync all along: no window strays from the others by more than the media path's jitter.
    assert max(lags) - min(lags) < 0.08, lags

    # Its video is the avatar's face, a frame every 1/25 s all along.
    frames = int(streams["video"]["nb_read_frames"])
    assert frames == pytest.approx(duration * 25, abs=3), frames
    pixel = frame_at(path, duration / 2)[30, 80].astype(int)
    assert np.abs(pixel - FACE).max() < 30, pixel


#: One cue a second over the 8 s clip.
LONG_SRT = "".join(
    f"{n}\n00:00:0{n - 1},000 --> 00:00:0{n - 1},900\nSecond {n}.\n\n" for n in range(1, 9)
)


def test_cancelled_recorded_job_keeps_a_partial_file(
    stack: LocalStack, s3_server: str, tmp_path: Path
) -> None:
    from producers import cancel, get_status

    clip = audio.chirp(tmp_path / "long.ogg", seconds=8.0)
    job_id = enqueue(source=str(clip), record=True, transcript=LONG_SRT)
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while time.monotonic() < deadline and get_status(job_id).get("seconds_streamed", 0) < 2.5:
        time.sleep(0.1)
    cancel(job_id)
    (result,) = ended(stack, job_id)
    assert result["status"] == "cancelled" and result["cancelled_while"] == "playing", result
    recording = result["recording"]
    assert recording["partial"] is True and recording["url"].startswith("file://"), recording
    path = fetch(recording, s3_server, tmp_path)
    assert path.is_relative_to(stack.workdir / "videos")
    info = probe(path)
    assert info["format"]["tags"]["comment"] == "partial"
    duration = float(info["format"]["duration"])
    assert 1.5 < duration < 6.0, duration
    # Its captions stop where it stops: the cues it holds, the last one cut there.
    vtt = fetch(recording, s3_server, tmp_path, "captions_url").read_text()
    cues = parse_transcript(vtt).cues(None) or []
    whole = parse_transcript(LONG_SRT).cues(None) or []
    kept = [c for c in whole if c.start < recording["duration"]]
    assert len(cues) == len(kept) and 1 <= len(cues) < len(whole), (cues, recording)
    assert (cues[-1].start, cues[-1].text) == (kept[-1].start, kept[-1].text)
    assert cues[-1].end == pytest.approx(min(kept[-1].end, recording["duration"]), abs=0.002)
    # What was rendered is the source's beginning.
    recorded = pcm_of(path)
    source = pcm_of(clip)[: len(recorded)]
    median, _lags = windowed_correlation(recorded, source, best_correlation(recorded, source)[1])
    assert median > 0.6, median


def test_warm_room_recording_holds_only_its_own_job(
    stack: LocalStack, s3_server: str, tmp_path: Path
) -> None:
    room = f"warm-{uuid.uuid4().hex[:8]}"
    low = audio.tone(tmp_path / "low.ogg", seconds=3.0, freq=440.0)
    high = audio.tone(tmp_path / "high.ogg", seconds=3.0, freq=1500.0)
    # Enqueued together: the second is parked and plays the moment the first ends.
    first = enqueue(room=room, source=str(low), record=True, lead=0.2)
    second = enqueue(room=room, source=str(high), record=True, lead=0.2)
    one, two = ended(stack, first, second)
    assert (one["status"], two["status"]) == ("completed", "completed"), (one, two)
    assert two["warm"] is True, two
    gap = two["timestamps"]["first_byte"] - one["timestamps"]["playback_finished"]
    print(f"back to back, both recorded: {gap:.2f} s from the first's end to the second's start")
    pcm_one = pcm_of(fetch(one["recording"], s3_server, tmp_path))
    pcm_two = pcm_of(fetch(two["recording"], s3_server, tmp_path))
    print(
        f"first: 440 Hz {tone_energy(pcm_one, 440):.3f}, 1500 Hz {tone_energy(pcm_one, 1500):.5f}"
    )
    assert tone_energy(pcm_one, 440) > 0.8
    assert tone_energy(pcm_two, 1500) > 0.8
    # Not a sample of the next job's tone in the first one's last half second.
    assert tone_energy(pcm_one[-RATE // 2 :], 1500) < 0.01
