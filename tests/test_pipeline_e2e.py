"""End to end on the local stack: producer → Redis → real `celery worker` → LiveKit room →
avatar emulator, with real ffmpeg. Runs inside the private network namespace."""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import json
import subprocess
import time
import uuid
import wave
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import requests
from livekit import api

from avatarq.ledger.keys import job_events_key
from avatarq.results import parse_result
from avatarq.settings import Settings
from avatarq_dev.stack import LocalStack, local_stack
from tasks.decode import ffmpeg_binary
from tests import audio
from tests.httpserve import serving
from tests.netns import NETNS
from tests.ports import refused_port
from tests.waiting import wait_terminal

pytestmark = NETNS

JOB_TIMEOUT_S = 90.0
WARM_IDLE_S = 3.0
#: Worker settings that keep fault tests short: few quick retries, short avatar timeout.
FAST_FAULTS = {
    "AVATARQ_MAX_RETRIES": "2",
    "AVATARQ_RETRY_BASE": "0.2",
    "AVATARQ_RETRY_CAP": "0.5",
    "AVATARQ_AVATAR_START_ATTEMPTS": "2",
    "AVATARQ_AVATAR_JOIN_TIMEOUT": "4",
    "AVATARQ_WARM_IDLE": str(WARM_IDLE_S),
}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    with refused_port() as dead, local_stack(tmp_path_factory.mktemp("stack")) as s:
        # A second configured avatar server, named by jobs, that nothing listens on.
        servers = {"dead": {"url": f"http://127.0.0.1:{dead}"}}
        extra_env = {**FAST_FAULTS, "AVATARQ_AVATAR_SERVERS": json.dumps(servers)}
        s.start_worker("e2e", concurrency=4, extra_env=extra_env)
        with s.current():
            yield s


@pytest.fixture
def faults(stack: LocalStack) -> Iterator[Any]:
    def set_faults(**changes: Any) -> None:
        r = requests.post(f"{stack.avatar_url}/_emulator/faults", json=changes, timeout=5)
        r.raise_for_status()

    yield set_faults
    set_faults(fail_next_starts=0, join=True, leave_after_s=None)


def run_job(stack: LocalStack, **job: Any) -> dict[str, Any]:
    from producers import enqueue

    # A room of its own per job unless asked: no warm avatar carries over between tests.
    job.setdefault("room", f"e2e-{uuid.uuid4().hex[:8]}")
    handle = enqueue({"avatar_id": "anna", **job})
    status = wait_terminal(
        handle.job_id,
        timeout=JOB_TIMEOUT_S,
        context=lambda: "\n".join(w.tail(60) for w in stack.workers),
    )[handle.job_id]
    parse_result(status)  # every recorded result is a typed JobResult
    return status


def events_of(stack: LocalStack, job_id: str) -> list[dict[str, Any]]:
    client = redis.Redis.from_url(stack.redis.url)
    return [
        {"event": f[b"event"].decode(), **json.loads(f[b"data"])}
        for _id, f in client.xrange(job_events_key(job_id))
    ]


def reference_pcm(path: Path, rate: int) -> bytes:
    argv = [ffmpeg_binary(Settings()), "-nostdin", "-loglevel", "error", "-i", str(path)]
    argv += ["-f", "s16le", "-acodec", "pcm_s16le", "-ac", "1", "-ar", str(rate), "pipe:1"]
    return subprocess.run(argv, capture_output=True, check=True, timeout=60).stdout


def test_job_plays_end_to_end(stack: LocalStack, tmp_path: Path) -> None:
    clip = audio.chirp(tmp_path / "clip.ogg", seconds=3.0, rate=24000)
    lead = 0.3
    result = run_job(stack, source=str(clip), lead=lead, metadata={"campaign": "e2e"})
    assert result["status"] == "completed", result
    assert result["metadata"] == {"campaign": "e2e"} and result["attempt"] == 1

    # The avatar received exactly ffmpeg's decode of the source, sample for sample.
    expected = reference_pcm(clip, 16000)
    wav_path = stack.recordings / f"{result['avatar_session_id']}.wav"
    with wave.open(str(wav_path)) as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (16000, 1, 2)
        received = w.readframes(w.getnframes())
    assert received == expected

    seconds = len(expected) / 32000
    assert result["seconds_streamed"] == pytest.approx(seconds, abs=1e-3)
    # Real-time pacing: streaming cannot finish before the audio's length minus the lead.
    ts = result["timestamps"]
    assert ts["last_byte"] - ts["first_byte"] >= seconds - lead - 0.11  # first chunk is 100 ms
    # The result carries the avatar's own playback report.
    assert result["playback_confirmed"] and result["interrupted"] is False
    assert result["playback_position"] == pytest.approx(seconds, abs=0.15)
    assert ts["picked"] <= ts["room_joined"] <= ts["avatar_requested"] <= ts["avatar_ready"]
    assert ts["avatar_ready"] <= ts["first_byte"]
    assert ts["first_byte"] <= ts["last_byte"] <= ts["playback_finished"]

    events = events_of(stack, result["job_id"])
    names = [e["event"] for e in events]
    assert names[:2] == ["job.started", "job.avatar_ready"] and names[-1] == "job.completed"
    progress = [e["seconds_streamed"] for e in events if e["event"] == "job.progress"]
    assert len(progress) >= 2 and progress == sorted(progress)
    assert progress[-1] == pytest.approx(seconds, abs=1e-3)
    assert set(names[2:-1]) == {"job.progress"}


#: How long the slow source's server waits before each answer.
SOURCE_DELAY_S = 1.5


@contextlib.contextmanager
def slow_site(root: Path) -> Iterator[str]:
    """Files under `root` over HTTP on loopback, each answer `SOURCE_DELAY_S` late."""

    class Slow(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, directory=str(root), **kwargs)

        def do_GET(self) -> None:
            time.sleep(SOURCE_DELAY_S)
            super().do_GET()

        def log_message(self, *args: Any) -> None:
            pass

    with serving(http.server.ThreadingHTTPServer(("127.0.0.1", 0), Slow)) as base:
        yield base


def room_identities(stack: LocalStack, room: str) -> set[str]:
    async def listed() -> set[str]:
        lkapi = api.LiveKitAPI(stack.livekit_url, "devkey", stack.api_secret)
        try:
            found = await lkapi.room.list_participants(api.ListParticipantsRequest(room=room))
        finally:
            await lkapi.aclose()
        return {p.identity for p in found.participants}

    return asyncio.run(listed())


def test_a_cold_start_joins_its_room_while_its_source_downloads(
    stack: LocalStack, tmp_path: Path
) -> None:
    audio.chirp(tmp_path / "slow.wav", seconds=1.0)
    with slow_site(tmp_path) as base:
        result = run_job(stack, source=f"{base}/slow.wav")
    assert result["status"] == "completed", result
    ts = result["timestamps"]
    # In the room long before the source's first answer, and the avatar asked for after it.
    assert ts["room_joined"] - ts["picked"] < SOURCE_DELAY_S
    assert ts["avatar_requested"] - ts["picked"] > SOURCE_DELAY_S


def test_a_bad_source_leaves_the_room_it_joined_and_starts_no_avatar(
    stack: LocalStack, tmp_path: Path
) -> None:
    room = f"e2e-{uuid.uuid4().hex[:8]}"
    with slow_site(tmp_path) as base:
        result = run_job(stack, room=room, source=f"{base}/missing.wav")
    assert result["status"] == "failed" and result["attempt"] == 1, result
    assert "missing.wav" in result["error"]
    deadline = time.monotonic() + 10
    while (left := room_identities(stack, room)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert left == set()
    found = requests.get(f"{stack.avatar_url}/v1/sessions", params={"room": room}, timeout=5)
    assert found.json() == []


def test_missing_file_fails_permanently(stack: LocalStack, tmp_path: Path) -> None:
    result = run_job(stack, source=str(tmp_path / "nope.wav"))
    assert result["status"] == "failed" and result["reason"] == "source_not_found"
    assert "nope.wav" in result["error"] and result["attempt"] == 1


def test_non_audio_file_fails_permanently(stack: LocalStack, tmp_path: Path) -> None:
    result = run_job(stack, source=str(audio.text_file(tmp_path / "notes.wav")))
    assert result["status"] == "failed" and result["reason"] == "invalid_audio", result
    assert "not an audio file" in result["error"]
    assert result["attempt"] == 1
    assert "job.retrying" not in [e["event"] for e in events_of(stack, result["job_id"])]


def test_audio_over_max_duration_fails_permanently(stack: LocalStack, tmp_path: Path) -> None:
    result = run_job(stack, source=str(audio.tone(tmp_path / "t.wav", seconds=2.0)), max_duration=1)
    assert result["status"] == "failed" and result["reason"] == "too_long", result
    assert "over the 1s maximum" in result["error"] and result["attempt"] == 1


def test_zero_length_audio_fails_permanently(stack: LocalStack, tmp_path: Path) -> None:
    empty = tmp_path / "empty.wav"
    with wave.open(str(empty), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
    result = run_job(stack, source=str(empty))
    assert result["status"] == "failed" and result["attempt"] == 1, result
    assert result["reason"] == "no_audio" and "no audio decoded" in result["error"]


def test_avatar_server_403_is_not_retried(stack: LocalStack, tmp_path: Path, faults: Any) -> None:
    faults(fail_next_starts=1, fail_status=403)
    result = run_job(stack, source=str(audio.tone(tmp_path / "t.wav", seconds=1.0)))
    assert result["status"] == "failed" and result["reason"] == "avatar_rejected", result
    assert "HTTP 403" in result["error"] and result["attempt"] == 1


def test_unreachable_avatar_server_retries_then_fails(stack: LocalStack, tmp_path: Path) -> None:
    result = run_job(
        stack, source=str(audio.tone(tmp_path / "t.wav", seconds=1.0)), avatar_server="dead"
    )
    assert result["status"] == "failed" and result["reason"] == "avatar_unavailable", result
    assert result["attempt"] == 3  # 1 + AVATARQ_MAX_RETRIES
    retries = [e for e in events_of(stack, result["job_id"]) if e["event"] == "job.retrying"]
    assert [e["attempt"] for e in retries] == [1, 2]


def test_unknown_avatar_server_name_fails_alone(stack: LocalStack, tmp_path: Path) -> None:
    result = run_job(
        stack, source=str(audio.tone(tmp_path / "t.wav", seconds=1.0)), avatar_server="nope"
    )
    assert result["status"] == "failed" and result["reason"] == "unknown_avatar_server", result
    assert "'nope'" in result["error"] and "dead, default" in result["error"]


def test_a_job_cannot_send_the_license_to_a_url_it_names(stack: LocalStack, tmp_path: Path) -> None:
    """Critical: a raw message (any producer, any language) naming its own avatar server
    URL fails as invalid, and that URL never hears from the worker."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from avatarq.jobs import new_job_id
    from producers.client import celery_app
    from tests.httpserve import serving

    heard: list[str] = []

    class Spy(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's naming
            heard.append(self.headers.get("api-secret", ""))
            self.send_response(200)
            self.end_headers()

    from avatarq.celeryconfig import RENDER_TASK

    with serving(ThreadingHTTPServer(("127.0.0.1", 0), Spy)) as spy:
        job_id = new_job_id()
        payload = {
            "job_id": job_id,
            "room": f"e2e-{uuid.uuid4().hex[:8]}",
            "avatar_id": "anna",
            "source": str(audio.tone(tmp_path / "t.wav", seconds=1.0)),
            "avatar_server": spy,
        }
        celery_app().send_task(RENDER_TASK, args=[payload], task_id=job_id)
        status = wait_terminal(job_id, timeout=JOB_TIMEOUT_S)[job_id]
    assert status["status"] == "failed" and status["reason"] == "invalid_job", status
    assert "never a URL" in status["error"]
    assert heard == []


def test_avatar_server_500_then_200_recovers(
    stack: LocalStack, tmp_path: Path, faults: Any
) -> None:
    faults(fail_next_starts=1, fail_status=500)
    result = run_job(stack, source=str(audio.tone(tmp_path / "t.wav", seconds=1.0)))
    assert result["status"] == "completed" and result["attempt"] == 1, result


def test_avatar_never_joins_times_out(stack: LocalStack, tmp_path: Path, faults: Any) -> None:
    faults(join=False)
    result = run_job(stack, source=str(audio.tone(tmp_path / "t.wav", seconds=1.0)))
    assert result["status"] == "failed" and result["reason"] == "avatar_timeout", result
    assert "never joined the room" in result["error"] and result["attempt"] == 3


def test_back_to_back_jobs_reuse_the_warm_avatar(stack: LocalStack, tmp_path: Path) -> None:
    room = f"warm-{uuid.uuid4().hex[:8]}"
    clips = [audio.chirp(tmp_path / f"c{i}.wav", seconds=1.0 + i * 0.5) for i in range(2)]
    cold = run_job(stack, room=room, source=str(clips[0]), lead=0.2)
    warm = run_job(stack, room=room, source=str(clips[1]), lead=0.2)
    assert (cold["warm"], warm["warm"]) == (False, True), (cold, warm)
    # One avatar session played both jobs as two segments, in order, sample for sample.
    assert warm["avatar_session_id"] == cold["avatar_session_id"]
    session = requests.get(
        f"{stack.avatar_url}/v1/sessions/{cold['avatar_session_id']}", timeout=5
    ).json()
    assert [round(seg["received_s"], 3) for seg in session["segments"]] == [1.0, 1.5]
    with wave.open(session["wav_path"]) as w:
        received = w.readframes(w.getnframes())
    assert received == b"".join(reference_pcm(c, 16000) for c in clips)
    # The warm job skipped joining and starting the avatar.
    ts = warm["timestamps"]
    assert (
        ts["avatar_ready"] - ts["picked"]
        < cold["timestamps"]["avatar_ready"] - (cold["timestamps"]["picked"])
    )
    # After the idle window the avatar is let go; the next job starts cold.
    time.sleep(WARM_IDLE_S + 1.0)
    state = requests.get(
        f"{stack.avatar_url}/v1/sessions/{cold['avatar_session_id']}", timeout=5
    ).json()
    assert state["state"] == "stopped" and state["stop_reason"] == "stop_request"
    later = run_job(stack, room=room, source=str(clips[0]), lead=0.2)
    assert later["warm"] is False and later["avatar_session_id"] != cold["avatar_session_id"]


def test_length_limit_holds_for_audio_that_does_not_declare_its_length(
    stack: LocalStack, tmp_path: Path
) -> None:
    """FLAC written to a pipe carries no length: the limit is enforced while decoding."""
    wav = audio.tone(tmp_path / "long.wav", seconds=12.0)
    piped = tmp_path / "long.flac"
    with piped.open("wb") as out:
        argv = [ffmpeg_binary(Settings()), "-nostdin", "-loglevel", "error", "-i", str(wav)]
        subprocess.run([*argv, "-f", "flac", "pipe:1"], stdout=out, check=True, timeout=60)
    result = run_job(stack, source=str(piped), max_duration=3)
    assert result["status"] == "failed" and result["reason"] == "too_long", result
    assert result["attempt"] == 1


def test_truncated_file_fails_as_truncated(stack: LocalStack, tmp_path: Path) -> None:
    # Its header still declares 10 s; ffmpeg decodes 3 s and exits 0.
    whole = audio.tone(tmp_path / "whole.mp3", seconds=10.0, rate=16000)
    cut = tmp_path / "cut.mp3"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size * 3 // 10])
    result = run_job(stack, source=str(cut))
    assert result["status"] == "failed" and result["reason"] == "truncated_audio", result
    assert "declares" in result["error"] and result["attempt"] == 1
