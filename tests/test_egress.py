"""LiveKit Egress records a job's avatar, by itself and as a worker's recording backend: the
official server (state in Redis), a real egress server built from its Go module
(infra/build-egress), the emulator, a worker and moto for S3. Skips where the egress binary is
not built (docs/recordings-egress.md says why CI has none)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
import uuid
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from livekit import api

from avatarq.captions import parse_transcript
from avatarq.settings import Settings
from avatarq_dev import egress
from avatarq_dev.avatar_emulator import video
from avatarq_dev.stack import DEV_API_KEY, LocalStack, local_stack
from tasks.decode import ffmpeg_binary
from tasks.egress import ACTIVE_TIMEOUT_S, EgressError, EgressRecorder, check_destination
from tests import audio
from tests.netns import needs_netns
from tests.s3 import DUMMY_ENV, s3_client, s3_server
from tests.waiting import wait_terminal

__all__ = ["s3_server"]  # a fixture used by name below

BUCKET = "recordings"
AVATAR = "anna"
JOB_TIMEOUT_S = 90.0
#: Frames are decoded this small: enough to find the emulator's level meter.
PROBE_W, PROBE_H = 320, 180


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[LocalStack]:
    if missing := egress.why_unavailable():
        pytest.skip(f"LiveKit Egress: {missing}")
    s3_server: str = request.getfixturevalue("s3_server")  # only once Egress can run
    s3_client(s3_server).create_bucket(Bucket=BUCKET)
    storage = egress.s3_storage(
        endpoint=s3_server,
        bucket=BUCKET,
        region=DUMMY_ENV["AWS_DEFAULT_REGION"],
        key=DUMMY_ENV["AWS_ACCESS_KEY_ID"],
        secret=DUMMY_ENV["AWS_SECRET_ACCESS_KEY"],
    )
    with local_stack(tmp_path_factory.mktemp("egress"), livekit_redis=True) as s:
        # A long warm window: the recorded job plays on the avatar the first job started. Its
        # recorded jobs go through this stack's Egress, into the bucket Egress stores to.
        worker_env = {
            **DUMMY_ENV,
            "AVATARQ_WARM_IDLE": "120",
            "AVATARQ_RECORDING_BACKEND": "egress",
            "AVATARQ_EGRESS_URL": s.livekit_url,
            "AVATARQ_RECORDINGS": f"s3://{BUCKET}/jobs/",
            "AWS_ENDPOINT_URL_S3": s3_server,
        }
        s.start_worker("rec", concurrency=2, extra_env=worker_env)
        with egress.egress_service(s, storage=storage), s.current():
            yield s


def run_job(stack: LocalStack, room: str, source: Path, **job: Any) -> dict[str, Any]:
    return wait_for(stack, enqueue_job(room, source, **job))


def enqueue_job(room: str, source: Path, **job: Any) -> str:
    from producers import enqueue

    return enqueue({"avatar_id": AVATAR, "room": room, "source": str(source), **job}).job_id


def wait_for(stack: LocalStack, job_id: str) -> dict[str, Any]:
    return wait_terminal(
        job_id,
        timeout=JOB_TIMEOUT_S,
        context=lambda: "\n".join(p.tail(60) for p in [*stack.workers]),
    )[job_id]


def ffprobe(path: Path) -> dict[str, Any]:
    argv = ["ffprobe", "-v", "error", "-count_frames", "-show_streams", "-show_format"]
    out = subprocess.run([*argv, "-of", "json", str(path)], capture_output=True, timeout=120)
    assert out.returncode == 0, out.stderr.decode()
    return dict(json.loads(out.stdout))


def meter_lit_times(path: Path, fps: float) -> np.ndarray:
    """The times (s) of the frames that show the emulator's level meter lit, i.e. the avatar
    playing audio: its green is nowhere else in the picture."""
    argv = [ffmpeg_binary(Settings()), "-nostdin", "-loglevel", "error", "-i", str(path)]
    argv += ["-vf", f"scale={PROBE_W}:{PROBE_H}", "-f", "rawvideo", "-pix_fmt", "rgb24", "-"]
    raw = subprocess.run(argv, capture_output=True, check=True, timeout=120).stdout
    frames = np.frombuffer(raw, dtype=np.uint8).reshape(-1, PROBE_H, PROBE_W, 3).astype(int)
    green = np.abs(frames - np.array(video._METER_ON[:3])).max(axis=3) < 40
    lit = green.sum(axis=(1, 2)) >= 20
    return np.flatnonzero(lit) / fps


@pytest.mark.netns
@needs_netns
def test_egress_records_a_job_of_the_avatar(
    stack: LocalStack, s3_server: str, tmp_path: Path
) -> None:
    room = f"egress-{uuid.uuid4().hex[:8]}"
    first = run_job(stack, room, audio.tone(tmp_path / "warmup.wav", seconds=1.0))
    assert first["status"] == "completed", first

    recorder = EgressRecorder(stack.livekit_url, DEV_API_KEY, stack.api_secret)
    key = f"jobs/{room}.mp4"
    started = time.monotonic()
    egress_id = asyncio.run(recorder.start(room, f"avatar-{AVATAR}", key))
    seconds = 3.0
    played = run_job(stack, room, audio.chirp(tmp_path / "clip.ogg", seconds=seconds, rate=24000))
    assert played["status"] == "completed" and played["warm"], played
    recording = asyncio.run(recorder.stop(egress_id))
    recorded_s = time.monotonic() - started

    # Egress stored the file in S3 under the key asked for, with the size it reports.
    assert not recording.partial and recording.error is None, recording
    assert recording.url.endswith(key), recording
    path = tmp_path / "recording.mp4"
    s3_client(s3_server).download_file(BUCKET, key, str(path))
    assert path.stat().st_size == recording.size_bytes

    probe = ffprobe(path)
    streams = {s["codec_type"]: s for s in probe["streams"]}
    assert set(streams) == {"video", "audio"}, probe["streams"]
    vid = streams["video"]
    assert vid["codec_name"] == "h264", vid
    duration = float(probe["format"]["duration"])
    assert duration == pytest.approx(recording.duration_s, abs=0.5)
    # It covers what was recorded, from the start to the stop, less Egress's own start-up.
    assert recorded_s - 3.0 <= duration <= recorded_s + 0.5, (duration, recorded_s)
    fps = float(Fraction(vid["avg_frame_rate"]))
    assert int(vid["nb_read_frames"]) >= 0.9 * fps * duration, vid

    # The avatar's video in the file follows the job: the meter is lit for as long as the
    # audio played, and all of it lies inside the file.
    lit = meter_lit_times(path, fps)
    assert lit.size > 0, "no frame of the recording shows the avatar playing"
    span = lit[-1] - lit[0]
    assert span == pytest.approx(seconds, abs=0.3), span
    assert lit[0] > 0.0 and lit[-1] < duration


#: The recorded job's captions: two cues inside its 3 s.
SRT = (
    "1\n00:00:00,000 --> 00:00:01,200\nHello there.\n\n"
    "2\n00:00:01,500 --> 00:00:02,900\nA second line.\n"
)


@pytest.mark.netns
@needs_netns
def test_a_recorded_job_records_through_egress_with_its_captions_beside(
    stack: LocalStack, s3_server: str, tmp_path: Path
) -> None:
    room = f"egress-{uuid.uuid4().hex[:8]}"
    seconds = 3.0
    clip = audio.chirp(tmp_path / "clip.ogg", seconds=seconds, rate=24000)
    played = run_job(stack, room, clip, record=True, transcript=SRT)
    assert played["status"] == "completed", played
    ts = played["timestamps"]
    print(f"avatar ready to first byte: {ts['first_byte'] - ts['avatar_ready']:.2f} s")
    recording = played["recording"]
    key = f"jobs/{played['job_id']}/attempt-1.mp4"
    # The worker's Egress recorded it, to the key under AVATARQ_RECORDINGS's prefix.
    assert recording["backend"] == "egress" and recording["partial"] is False, recording
    assert recording["error"] is None and recording["url"].endswith(key), recording
    path = tmp_path / "recording.mp4"
    s3_client(s3_server).download_file(BUCKET, key, str(path))
    assert path.stat().st_size == recording["size"]
    probe = ffprobe(path)
    streams = {s["codec_type"]: s for s in probe["streams"]}
    assert set(streams) == {"video", "audio"}, probe["streams"]
    duration = float(probe["format"]["duration"])
    assert duration == pytest.approx(recording["duration"], abs=0.5)
    # The whole job is in it: the meter is lit for as long as the audio played.
    lit = meter_lit_times(path, float(Fraction(streams["video"]["avg_frame_rate"])))
    assert lit.size > 0 and lit[-1] - lit[0] == pytest.approx(seconds, abs=0.3), lit
    assert lit[0] > 0.0 and lit[-1] < duration

    # The WebVTT beside it, its cues on the file's time: the first shows as the meter lights.
    assert recording["captions_url"] == f"s3://{BUCKET}/jobs/{played['job_id']}/attempt-1.vtt"
    body = s3_client(s3_server).get_object(Bucket=BUCKET, Key=key.replace(".mp4", ".vtt"))
    cues = parse_transcript(body["Body"].read().decode()).cues(None) or []
    assert [c.text for c in cues] == ["Hello there.", "A second line."], cues
    print(f"first cue at {cues[0].start:.3f} s of the file, the meter lit at {lit[0]:.3f} s")
    assert cues[0].start == pytest.approx(lit[0], abs=0.3), (cues, lit[0])
    assert cues[1].start - cues[0].start == pytest.approx(1.5, abs=0.01)


@pytest.mark.netns
@needs_netns
def test_a_cancelled_job_leaves_a_partial_egress_recording(
    stack: LocalStack, s3_server: str, tmp_path: Path
) -> None:
    from producers import cancel, get_status

    room = f"egress-{uuid.uuid4().hex[:8]}"
    job_id = enqueue_job(room, audio.chirp(tmp_path / "long.ogg", seconds=8.0), record=True)
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while time.monotonic() < deadline and get_status(job_id).get("seconds_streamed", 0) < 2.5:
        time.sleep(0.1)
    cancel(job_id)
    result = wait_for(stack, job_id)
    assert result["status"] == "cancelled", result
    recording = result["recording"]
    assert recording["backend"] == "egress" and recording["partial"] is True, recording
    assert recording["url"].endswith(f"jobs/{job_id}/attempt-1.mp4"), recording
    path = tmp_path / "partial.mp4"
    s3_client(s3_server).download_file(BUCKET, f"jobs/{job_id}/attempt-1.mp4", str(path))
    assert 1.5 <= float(ffprobe(path)["format"]["duration"]) <= 8.0


@pytest.mark.netns
@needs_netns
def test_a_start_for_a_participant_who_never_comes_fails_with_egress_reason(
    stack: LocalStack,
) -> None:
    room = f"egress-{uuid.uuid4().hex[:8]}"
    asyncio.run(_create_room(stack, room))
    recorder = EgressRecorder(stack.livekit_url, DEV_API_KEY, stack.api_secret)
    started = time.monotonic()
    says = r"ended before it recorded 'avatar-nobody': EGRESS_FAILED participant avatar-nobody"
    with pytest.raises(EgressError, match=says):
        asyncio.run(recorder.start(room, "avatar-nobody", f"jobs/{room}.mp4"))
    # Egress's own bound (30 s without the participant's tracks), not ours, ended it.
    assert time.monotonic() - started < ACTIVE_TIMEOUT_S
    assert asyncio.run(_active_egresses(stack, room)) == []


@pytest.mark.netns
@needs_netns
def test_an_egress_that_ends_before_the_stop_gives_a_partial_file(
    stack: LocalStack, s3_server: str, tmp_path: Path
) -> None:
    room = f"egress-{uuid.uuid4().hex[:8]}"
    first = run_job(stack, room, audio.tone(tmp_path / "warmup.wav", seconds=1.0))
    assert first["status"] == "completed", first
    recorder = EgressRecorder(stack.livekit_url, DEV_API_KEY, stack.api_secret)
    key = f"jobs/{room}.mp4"
    egress_id = asyncio.run(recorder.start(room, f"avatar-{AVATAR}", key))
    time.sleep(2.0)
    asyncio.run(_remove(stack, room, f"avatar-{AVATAR}"))  # the avatar is gone mid-recording
    assert asyncio.run(_active_egresses(stack, room)) == []  # and Egress ended on its own

    recording = asyncio.run(recorder.stop(egress_id))
    assert recording.partial and recording.error, recording
    assert recording.error.startswith("EGRESS_"), recording.error
    # What was recorded until the avatar left is stored, and plays.
    path = tmp_path / "partial.mp4"
    s3_client(s3_server).download_file(BUCKET, key, str(path))
    assert path.stat().st_size == recording.size_bytes
    assert 1.0 <= float(ffprobe(path)["format"]["duration"]) <= 10.0


async def _remove(stack: LocalStack, room: str, identity: str) -> None:
    async with api.LiveKitAPI(stack.livekit_url, DEV_API_KEY, stack.api_secret) as lkapi:
        await lkapi.room.remove_participant(
            api.RoomParticipantIdentity(room=room, identity=identity)
        )


async def _create_room(stack: LocalStack, room: str) -> None:
    async with api.LiveKitAPI(stack.livekit_url, DEV_API_KEY, stack.api_secret) as lkapi:
        await lkapi.room.create_room(api.CreateRoomRequest(name=room, empty_timeout=60))


async def _active_egresses(stack: LocalStack, room: str) -> list[str]:
    async with api.LiveKitAPI(stack.livekit_url, DEV_API_KEY, stack.api_secret) as lkapi:
        deadline = time.monotonic() + 10.0
        while True:
            found = await lkapi.egress.list_egress(
                api.ListEgressRequest(room_name=room, active=True)
            )
            active = [e.egress_id for e in found.items]
            if not active or time.monotonic() > deadline:
                return active
            await asyncio.sleep(0.25)


def test_destination_must_be_an_mp4_path_inside_the_storage() -> None:
    assert check_destination("jobs/a.mp4") == "jobs/a.mp4"
    for bad, says in [
        ("jobs/a.webm", "must end in .mp4"),
        ("/tmp/a.mp4", "not an absolute path or URL"),
        ("s3://bucket/a.mp4", "not an absolute path or URL"),
        ("jobs/../../a.mp4", "may not contain '..'"),
    ]:
        with pytest.raises(ValueError, match=says):
            check_destination(bad)


def test_no_egress_unless_a_setting_names_one() -> None:
    assert EgressRecorder.from_settings(Settings()) is None
    recorder = EgressRecorder.from_settings(Settings(AVATARQ_EGRESS_URL="https://lk.example"))
    assert recorder is not None and recorder.url == "https://lk.example"
