"""Recordings without a room: the job option, where files go, the recorder's audio timeline,
and the result's `recording` (the end-to-end proof: tests/test_recording_e2e.py)."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path
from typing import Any

import pytest

from avatarq.captions import Cue, parse_transcript
from avatarq.errors import InvalidJob
from avatarq.jobs import parse_job
from avatarq.results import Played, Recording, parse_result
from avatarq.settings import Settings
from tasks.context import JobHook, PlayContext
from tasks.jobrun import Ending
from tasks.recorder import AUDIO_RATE, AudioTimeline
from tasks.recording import EgressRecordingHook, RecordingHook, recording_hooks
from tasks.recording_store import (
    captions_name,
    destination_of,
    egress_filepath,
    object_name,
    store,
    store_captions,
)
from tests.fakes import Stand
from tests.ports import refused_port
from tests.s3 import aws_env, s3_client, s3_server

__all__ = ["aws_env", "s3_server"]  # fixtures used by name below

JOB = {"room": "lobby", "avatar_id": "anna", "source": "s3://clips/a.mp3"}


@pytest.mark.parametrize("record", [True, False, "s3://rec-bucket/prefix/", "s3://rec-bucket"])
def test_record_accepts_a_flag_or_a_bucket(record: bool | str) -> None:
    assert parse_job({**JOB, "record": record}).record == record


@pytest.mark.parametrize("record", ["/tmp/videos", "file:///etc/", "https://x/y", "s3://"])
def test_record_refuses_anything_else_by_name(record: str) -> None:
    with pytest.raises(InvalidJob, match=r"record: record must be true, false or an s3://"):
        parse_job({**JOB, "record": record})


def test_destination_is_the_jobs_bucket_else_the_setting() -> None:
    settings = Settings(AVATARQ_RECORDINGS="/srv/videos", AVATARQ_RECORDING_BUCKETS="rec-bucket")  # type: ignore[call-arg]
    assert destination_of(parse_job(JOB), settings) is None
    assert destination_of(parse_job({**JOB, "record": True}), settings) == "/srv/videos"
    job = parse_job({**JOB, "record": "s3://rec-bucket/x/"})
    assert destination_of(job, settings) == "s3://rec-bucket/x/"
    # A bucket the worker was not told to write to is refused, by name.
    with pytest.raises(ValueError, match="'other-bucket' is not in AVATARQ_RECORDING_BUCKETS"):
        destination_of(parse_job({**JOB, "record": "s3://other-bucket/x/"}), settings)
    in_setting = Settings(AVATARQ_RECORDINGS="s3://main-bucket/videos/")  # type: ignore[call-arg]
    assert destination_of(parse_job({**JOB, "record": "s3://main-bucket/y/"}), in_setting)
    with pytest.raises(ValueError, match="AVATARQ_RECORDINGS is not set"):
        destination_of(parse_job({**JOB, "record": True}), Settings())


def test_store_moves_the_file_under_the_directory(tmp_path: Path) -> None:
    made = tmp_path / "made.mp4"
    made.write_bytes(b"mp4")
    url = store(made, str(tmp_path / "videos"), object_name("job-1", 2), partial=False,
                settings=Settings())  # fmt: skip
    kept = tmp_path / "videos" / "job-1" / "attempt-2.mp4"
    assert url == kept.as_uri() and kept.read_bytes() == b"mp4" and not made.exists()


def frame(value: int, samples: int = 480) -> bytes:
    return value.to_bytes(2, "little", signed=True) * samples


def test_audio_timeline_keeps_the_segment_and_its_pauses() -> None:
    out = io.BytesIO()
    timeline = AudioTimeline(out)  # type: ignore[arg-type]
    ten_ms = 480 / AUDIO_RATE
    # Before the start mark arrives: one frame played before it, one just after.
    timeline.add(100.0, frame(1), 480)
    timeline.add(100.0 + 2 * ten_ms, frame(2), 480)
    timeline.begin(100.0)
    timeline.add(100.0 + 3 * ten_ms, frame(3), 480)
    # A 100 ms pause in the avatar's audio stays a pause.
    timeline.add(100.0 + 14 * ten_ms, frame(4), 480)
    timeline.finish(20 * 480)
    pcm = out.getvalue()
    assert len(pcm) == 2 * 20 * 480
    samples = [int.from_bytes(pcm[i : i + 2], "little", signed=True) for i in range(0, len(pcm), 2)]
    assert samples[:480] == [2] * 480 and samples[480:960] == [3] * 480
    assert samples[960 : 13 * 480] == [0] * (11 * 480)
    assert samples[13 * 480 : 14 * 480] == [4] * 480
    assert samples[14 * 480 :] == [0] * (6 * 480)


def test_audio_timeline_cuts_at_the_end() -> None:
    out = io.BytesIO()
    timeline = AudioTimeline(out)  # type: ignore[arg-type]
    timeline.begin(0.0)
    for i in range(1, 11):
        timeline.add(i * 0.01, frame(i), 480)
    timeline.finish(5 * 480)
    assert len(out.getvalue()) == 2 * 5 * 480


def test_recording_travels_in_the_result() -> None:
    recording = Recording(url="s3://b/k.mp4", duration=3.2, size=1000, partial=True,
                          backend="local")  # fmt: skip
    played = Played(
        job_id="j", attempt=1, status="completed", audio_duration=3.2, seconds_streamed=3.2,
        playback_position=3.2, interrupted=False, playback_confirmed=True, avatar_server="default",
        avatar_session_id=None, warm=False, lead=0.5, sample_rate=16000,
        timestamps={"picked": 1.0}, recording=recording,
    )  # fmt: skip
    record = played.as_record()
    assert record["recording"]["partial"] is True and record["recording"]["url"] == "s3://b/k.mp4"
    assert parse_result(record) == played
    assert "recording" not in played.model_copy(update={"recording": None}).as_record()


# --- the hook in a run (tests/fakes.py): a recording never fails the job --------------------


def recorded_run(settings: Settings, **job: object) -> dict[str, object]:
    stand = Stand(settings, hooks=[recording_hooks(settings)])
    payload = {"job_id": "rec-1", "room": "room-1", "avatar_id": "ava", "source": "/a.wav", **job}
    outcome = asyncio.run(stand.run(payload))
    assert outcome.ending is Ending.PLAYED, outcome
    assert outcome.result is not None
    return outcome.result.as_record()


def test_a_recorder_that_cannot_join_leaves_the_job_played_and_says_why(tmp_path: Path) -> None:
    with refused_port() as port:
        settings = Settings(  # type: ignore[call-arg]
            LIVEKIT_URL=f"ws://127.0.0.1:{port}", AVATARQ_RECORDINGS=str(tmp_path)
        )
        recording = recorded_run(settings, record=True)["recording"]
    assert isinstance(recording, dict)
    assert recording["url"] is None and recording["partial"] is True
    assert "the recorder was not ready" in str(recording["error"]), recording
    assert not any(tmp_path.iterdir())


def test_a_recording_with_nowhere_to_go_is_named_in_the_result() -> None:
    recording = recorded_run(Settings(), record=True)["recording"]
    assert isinstance(recording, dict) and recording["url"] is None
    assert recording["error"] == "the job asks for a recording and AVATARQ_RECORDINGS is not set"


def test_an_unrecorded_job_has_no_recording() -> None:
    assert "recording" not in recorded_run(Settings())


# --- the WebVTT beside the MP4, and the backend's choice --------------------------------------

SRT = (
    "1\n00:00:00,000 --> 00:00:00,800\nHello there.\n\n2\n00:00:01,000 --> 00:00:01,900\nGoodbye.\n"
)


class StoredAs(RecordingHook):
    """A backend whose recording is `made` (the captions part is the shared one)."""

    made: Recording

    async def _stored(self) -> Recording | None:
        return self.made


def captioned_run(settings: Settings, made: Recording, **job: object) -> dict[str, object]:
    def make(play: PlayContext) -> RecordingHook:
        hook = StoredAs(play, settings, destination_of(play.job, settings) or "")
        hook.made = made
        return hook

    stand = Stand(settings, hooks=[make])
    payload = {"job_id": "cap-1", "room": "r", "avatar_id": "ava", "source": "/a.wav", **job}
    outcome = asyncio.run(stand.run(payload))
    assert outcome.result is not None, outcome
    recording = outcome.result.as_record()["recording"]
    assert isinstance(recording, dict)
    return recording


def test_a_partial_recordings_webvtt_holds_the_cues_up_to_where_it_stops(tmp_path: Path) -> None:
    settings = Settings(AVATARQ_RECORDINGS=str(tmp_path))  # type: ignore[call-arg]
    mp4 = (tmp_path / "cap-1" / "attempt-1.mp4").as_uri()
    made = Recording(url=mp4, duration=1.2, size=10, partial=True, backend="local")
    recording = captioned_run(settings, made, record=True, transcript=SRT)
    vtt = tmp_path / "cap-1" / "attempt-1.vtt"
    assert recording["captions_url"] == vtt.as_uri(), recording
    # Cut where the recording stops: the second cue is 0.2 s of its 0.9.
    assert parse_transcript(vtt.read_text()).cues(None) == [
        Cue(0.0, 0.8, "Hello there."),
        Cue(1.0, 1.2, "Goodbye."),
    ]
    whole = made.model_copy(update={"partial": False})
    captioned_run(settings, whole, record=True, transcript=SRT)
    assert parse_transcript(vtt.read_text()).cues(None) == parse_transcript(SRT).cues(None)


def test_no_webvtt_without_a_transcript_or_without_a_file(tmp_path: Path) -> None:
    settings = Settings(AVATARQ_RECORDINGS=str(tmp_path))  # type: ignore[call-arg]
    made = Recording(url="file:///x.mp4", duration=2.0, size=10, partial=False, backend="local")
    assert captioned_run(settings, made, record=True)["captions_url"] is None
    failed = Recording(url=None, duration=0.0, size=0, partial=True, backend="local", error="x")
    assert captioned_run(settings, failed, record=True, transcript=SRT)["captions_url"] is None
    assert not any(tmp_path.iterdir())


def test_the_webvtt_goes_to_s3_beside_the_mp4(
    s3_server: str, aws_env: dict[str, str], tmp_path: Path
) -> None:
    s3_client(s3_server).create_bucket(Bucket="vtt-bucket")
    settings = Settings(AWS_ENDPOINT_URL_S3=s3_server)  # type: ignore[call-arg]
    name = captions_name(object_name("job-9", 2))
    assert name == "job-9/attempt-2.vtt"
    url = store_captions("WEBVTT\n", "s3://vtt-bucket/pre/", name, settings=settings)
    assert url == "s3://vtt-bucket/pre/job-9/attempt-2.vtt"
    got = s3_client(s3_server).get_object(Bucket="vtt-bucket", Key="pre/job-9/attempt-2.vtt")
    assert got["ContentType"] == "text/vtt" and got["Body"].read() == b"WEBVTT\n"


def test_egress_backend_needs_an_egress_url_named_at_start() -> None:
    with pytest.raises(
        ValueError, match="AVATARQ_RECORDING_BACKEND=egress needs AVATARQ_EGRESS_URL"
    ):
        Settings(AVATARQ_RECORDING_BACKEND="egress")  # type: ignore[call-arg]
    # The URL alone keeps the local recorder: the backend is chosen by name only.
    assert Settings(AVATARQ_EGRESS_URL="http://lk").recording_backend == "local"  # type: ignore[call-arg]


def test_egress_backend_records_through_egress() -> None:
    with refused_port() as port:
        egress_url = f"http://127.0.0.1:{port}"
        recording = egress_run(
            Settings(  # type: ignore[call-arg]
                AVATARQ_RECORDING_BACKEND="egress",
                AVATARQ_EGRESS_URL=egress_url,
                AVATARQ_RECORDINGS="s3://rec/videos/",
            )
        )
    # Nothing answers at that URL: the job plays, and its result says why there is no file.
    assert recording["backend"] == "egress" and recording["url"] is None, recording
    assert recording["error"].startswith(f"Egress did not record: Egress at {egress_url}")
    assert egress_filepath("s3://rec/videos/", "eg-1/attempt-1.mp4") == "videos/eg-1/attempt-1.mp4"
    assert egress_filepath("/srv/videos", "eg-1/attempt-1.mp4") == "eg-1/attempt-1.mp4"


def egress_run(settings: Settings) -> dict[str, Any]:
    """A recorded job's result `recording`, checking its hook is the Egress backend's."""
    seen: list[JobHook] = []

    def spy(play: PlayContext) -> JobHook:
        hook = recording_hooks(settings)(play)
        seen.append(hook)
        return hook

    stand = Stand(settings, hooks=[spy])
    payload = {
        "job_id": "eg-1",
        "room": "r",
        "avatar_id": "ava",
        "source": "/a.wav",
        "record": True,
    }
    outcome = asyncio.run(stand.run(payload))
    assert isinstance(seen[0], EgressRecordingHook)
    assert outcome.ending is Ending.PLAYED and outcome.result is not None
    recording: dict[str, Any] = outcome.result.as_record()["recording"]
    return recording
