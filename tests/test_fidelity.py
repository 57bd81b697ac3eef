"""Production fidelity: jobs on the official livekit-server against avatars that behave like
real avatar servers (the emulator's default is livekit-agents' AvatarRunner order; each other
behaviour is one `Faults` mode). Worker settings are the defaults, except where a test says.

The server runs with short room timeouts (3 s empty, 2 s departure) so that a job relying on
the room's own lifetime would be cut off within seconds; the real defaults are 300 s / 20 s.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import requests
from livekit import api, rtc

from avatarq.ledger.keys import job_events_key
from avatarq_dev import livekit_official
from avatarq_dev.avatar_emulator.behaviour import Faults
from avatarq_dev.stack import DEV_API_KEY, LocalStack, local_stack
from tests import audio
from tests.netns import NETNS
from tests.waiting import wait_terminal

pytestmark = NETNS

EMPTY_TIMEOUT_S, DEPARTURE_TIMEOUT_S = 3, 2
JOB_TIMEOUT_S = 120.0


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    if livekit_official.why_unavailable() is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(
                f"CI needs the official LiveKit server: {livekit_official.why_unavailable()}"
            )
        pytest.skip(f"official LiveKit server: {livekit_official.why_unavailable()}")
    with local_stack(
        tmp_path_factory.mktemp("fidelity"),
        room_timeouts=(EMPTY_TIMEOUT_S, DEPARTURE_TIMEOUT_S),
    ) as s:
        assert s.server == "official"
        s.start_worker("fid", concurrency=4)
        with s.current():
            yield s


@pytest.fixture
def faults(stack: LocalStack) -> Iterator[Any]:
    def set_faults(**changes: Any) -> None:
        r = requests.post(f"{stack.avatar_url}/_emulator/faults", json=changes, timeout=5)
        r.raise_for_status()

    yield set_faults
    set_faults(**Faults().model_dump())


def new_room() -> str:
    return f"fid-{uuid.uuid4().hex[:8]}"


def enqueue(**job: Any) -> str:
    from producers import enqueue as do_enqueue

    job.setdefault("room", new_room())
    return do_enqueue({"avatar_id": "anna", **job}).job_id


def wait(job_id: str, timeout: float = JOB_TIMEOUT_S) -> dict[str, Any]:
    return wait_terminal(job_id, timeout=timeout)[job_id]


def sessions(stack: LocalStack, room: str) -> list[dict[str, Any]]:
    r = requests.get(f"{stack.avatar_url}/v1/sessions", params={"room": room}, timeout=5)
    return list(r.json())


def retries(stack: LocalStack, job_id: str) -> int:
    client = redis.Redis.from_url(stack.redis.url)
    entries = client.xrange(job_events_key(job_id))
    return sum(1 for _id, f in entries if f[b"event"] == b"job.retrying")


def token(stack: LocalStack, room: str, identity: str, *, kind: str = "standard") -> str:
    return (
        api.AccessToken(DEV_API_KEY, stack.api_secret)
        .with_identity(identity)
        .with_kind(kind)  # type: ignore[arg-type]
        .with_grants(api.VideoGrants(room_join=True, room=room))
        .to_jwt()
    )


def wait_watching(stack: LocalStack, job_id: str, room: str) -> tuple[dict[str, Any], set[str]]:
    """The job's end, and every participant identity the server listed in its room meanwhile
    (hidden ones included: RoomService lists them)."""

    async def watch() -> set[str]:
        from producers import get_status
        from producers.client import is_terminal

        seen: set[str] = set()
        lkapi = api.LiveKitAPI(stack.livekit_url, DEV_API_KEY, stack.api_secret)
        try:
            deadline = time.monotonic() + JOB_TIMEOUT_S
            while time.monotonic() < deadline and not is_terminal(get_status(job_id)):
                listed = await lkapi.room.list_participants(api.ListParticipantsRequest(room=room))
                seen.update(p.identity for p in listed.participants)
                await asyncio.sleep(0.2)
        finally:
            await lkapi.aclose()
        return seen

    seen = asyncio.run(watch())
    return wait(job_id), seen


def wait_ended(stack: LocalStack, room: str, timeout: float = 20.0) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    found = sessions(stack, room)
    while time.monotonic() < deadline and not all(s["state"] == "stopped" for s in found):
        time.sleep(0.2)
        found = sessions(stack, room)
    return found


# -- rooms that hold only agents ----------------------------------------------------------


def test_job_longer_than_the_empty_timeout_plays_to_the_end(
    stack: LocalStack, tmp_path: Path
) -> None:
    # The worker creates the room with timeouts as long as the job (tasks/link/roomhold.py): the
    # server's 3 s default would close it, and no keeper joins (it would get all the audio).
    seconds = EMPTY_TIMEOUT_S + 4.0
    room = new_room()
    job_id = enqueue(room=room, source=str(audio.tone(tmp_path / "t.wav", seconds=seconds)))
    result, seen = wait_watching(stack, job_id, room)
    assert result["status"] == "completed" and result["attempt"] == 1, result
    assert result["playback_position"] == pytest.approx(seconds, abs=0.05)
    (session,) = sessions(stack, room)
    assert session["received_audio_s"] == pytest.approx(seconds, abs=1e-3)
    assert f"avatarq-{job_id}" in seen and f"avatarq-{job_id}-keeper" not in seen, seen


def test_a_room_made_for_a_shorter_stay_plays_a_short_job_without_a_keeper(
    stack: LocalStack, tmp_path: Path
) -> None:
    # Another service made the room with 10-minute timeouts: too short for the longest job a
    # worker may play (an hour), long enough for this one. The keeper, which receives a copy
    # of all the audio, joins only where the room would close before the job could end.
    room = new_room()

    async def make_room() -> None:
        lkapi = api.LiveKitAPI(stack.livekit_url, DEV_API_KEY, stack.api_secret)
        try:
            request = api.CreateRoomRequest(name=room, empty_timeout=600, departure_timeout=600)
            await lkapi.room.create_room(request)
        finally:
            await lkapi.aclose()

    asyncio.run(make_room())
    job_id = enqueue(room=room, source=str(audio.tone(tmp_path / "t.wav", seconds=2.0)))
    result, seen = wait_watching(stack, job_id, room)
    assert result["status"] == "completed" and result["attempt"] == 1, result
    assert f"avatarq-{job_id}" in seen and f"avatarq-{job_id}-keeper" not in seen, seen


def test_warm_room_outlives_its_empty_timeout(stack: LocalStack, tmp_path: Path) -> None:
    room = new_room()
    clip = str(audio.tone(tmp_path / "t.wav", seconds=1.0))
    first = wait(enqueue(room=room, source=clip))
    time.sleep(EMPTY_TIMEOUT_S + 2.0)  # idle, warm (AVATARQ_WARM_IDLE: 10 s by default)
    second = wait(enqueue(room=room, source=clip))
    assert (first["status"], second["status"]) == ("completed", "completed")
    assert second["warm"] is True and second["avatar_session_id"] == first["avatar_session_id"]


def test_a_viewer_who_leaves_mid_job_does_not_cut_it(stack: LocalStack, tmp_path: Path) -> None:
    # The viewer made the room (the server's 3 s / 2 s timeouts, which a job cannot change):
    # the worker joins a keeper, and the room outlives the viewer's leaving by far.
    room = new_room()
    seconds = DEPARTURE_TIMEOUT_S + 6.0
    clip = str(audio.tone(tmp_path / "t.wav", seconds=seconds))

    async def visit() -> str:
        viewer = rtc.Room()
        await viewer.connect(stack.livekit_url, token(stack, room, "viewer"))
        job_id = await asyncio.to_thread(enqueue, room=room, source=clip)
        await asyncio.sleep(2.0)
        await viewer.disconnect()
        return job_id

    job_id = asyncio.run(visit())
    result, seen = wait_watching(stack, job_id, room)
    assert result["status"] == "completed" and result["attempt"] == 1, result
    assert result["playback_position"] == pytest.approx(seconds, abs=0.05)
    assert f"avatarq-{job_id}-keeper" in seen, seen


# -- avatar behaviours ---------------------------------------------------------------------


def test_default_avatar_hears_the_speaking_and_listening_states(
    stack: LocalStack, tmp_path: Path
) -> None:
    room = new_room()
    result = wait(enqueue(room=room, source=str(audio.tone(tmp_path / "t.wav", seconds=1.0))))
    assert result["status"] == "completed", result
    (session,) = wait_ended(stack, room)
    assert session["agent_states"] == ["speaking", "listening"]
    assert session["bound_sender_identity"] == f"avatarq-{result['job_id']}"


def test_receiver_registered_after_the_video_loses_nothing(
    stack: LocalStack, tmp_path: Path, faults: Any
) -> None:
    faults(receiver_delay_s=1.5)
    room = new_room()
    result = wait(enqueue(room=room, source=str(audio.tone(tmp_path / "t.wav", seconds=2.0))))
    assert result["status"] == "completed" and result["playback_confirmed"], result
    (session,) = sessions(stack, room)
    assert session["received_audio_s"] == pytest.approx(2.0, abs=1e-3)


def test_slow_start_starts_one_session(stack: LocalStack, tmp_path: Path, faults: Any) -> None:
    faults(start_delay_s=3.0)
    room = new_room()
    result = wait(enqueue(room=room, source=str(audio.tone(tmp_path / "t.wav", seconds=1.0))))
    assert result["status"] == "completed", result
    assert len(sessions(stack, room)) == 1


@pytest.mark.parametrize("status", [409, 429, 503])
def test_busy_avatar_server_is_waited_out(
    stack: LocalStack, tmp_path: Path, faults: Any, status: int
) -> None:
    faults(fail_next_starts=1, fail_status=status, retry_after_s=0.5)
    room = new_room()
    result = wait(enqueue(room=room, source=str(audio.tone(tmp_path / "t.wav", seconds=1.0))))
    assert result["status"] == "completed" and result["attempt"] == 1, result
    assert len(sessions(stack, room)) == 1


@pytest.mark.parametrize("mode", [{"start_body": "text"}, {"stop_endpoint": False}])
def test_avatar_never_outlives_its_job(
    stack: LocalStack, tmp_path: Path, faults: Any, mode: dict[str, Any]
) -> None:
    """No session id to stop, or no stop endpoint: the avatar still leaves once its job (and
    its warm idle window, AVATARQ_WARM_IDLE) is over, removed from the room, even with a
    viewer who stays."""
    faults(**mode)
    room = new_room()

    async def watch() -> list[dict[str, Any]]:
        viewer = rtc.Room()
        await viewer.connect(stack.livekit_url, token(stack, room, "viewer"))
        try:
            job_id = enqueue(room=room, source=str(audio.tone(tmp_path / "t.wav", seconds=1.0)))
            result = await asyncio.to_thread(wait, job_id)
            assert result["status"] == "completed", result
            return await asyncio.to_thread(wait_ended, stack, room, 25.0)
        finally:
            await viewer.disconnect()

    ended = asyncio.run(watch())
    assert len(ended) == 1 and ended[0]["state"] == "stopped", ended


def test_sixteen_khz_avatar_gets_sixteen_khz_from_any_source(
    stack: LocalStack, tmp_path: Path, faults: Any
) -> None:
    faults(sample_rates=[16000])
    room = new_room()
    clip = audio.chirp(tmp_path / "c.wav", seconds=1.5, rate=48000)
    result = wait(enqueue(room=room, source=str(clip)))
    assert result["status"] == "completed" and result["sample_rate"] == 16000, result
    (session,) = sessions(stack, room)
    assert session["refused_rates"] == [] and session["segments"][0]["sample_rate"] == 16000


def test_avatar_that_never_reports_is_unconfirmed_not_replayed(
    stack: LocalStack, tmp_path: Path, faults: Any
) -> None:
    faults(report_playback=False)
    room = new_room()
    result = wait(enqueue(room=room, source=str(audio.tone(tmp_path / "t.wav", seconds=1.0))))
    assert result["status"] == "unconfirmed" and result["reason"] == "playback_unconfirmed"
    assert result["playback_confirmed"] is False and result["attempt"] == 1
    (session,) = sessions(stack, room)
    assert len(session["segments"]) == 1  # heard once


def test_under_reporting_avatar_replays_at_most_once(
    stack: LocalStack, tmp_path: Path, faults: Any
) -> None:
    faults(report_scale=0.5)
    room = new_room()
    job_id = enqueue(room=room, source=str(audio.tone(tmp_path / "t.wav", seconds=2.0)))
    result = wait(job_id)
    assert result["status"] == "failed" and result["reason"] == "incomplete_playback", result
    assert result["attempt"] == 2 and retries(stack, job_id) == 1
    played = sum(len(s["segments"]) for s in sessions(stack, room))
    assert played == 2


def test_duplicate_report_is_not_read_by_the_next_job(
    stack: LocalStack, tmp_path: Path, faults: Any
) -> None:
    faults(duplicate_reports=True)
    room = new_room()
    clip = str(audio.tone(tmp_path / "t.wav", seconds=1.0))
    first, second = enqueue(room=room, source=clip), enqueue(room=room, source=clip)
    a, b = wait(first), wait(second)
    assert (a["status"], b["status"]) == ("completed", "completed"), (a, b)
    assert b["warm"] is True and (a["attempt"], b["attempt"]) == (1, 1)


def test_avatar_bound_to_another_agent_never_swallows_the_job(
    stack: LocalStack, tmp_path: Path, faults: Any
) -> None:
    """A voice agent already in the room, and a receiver that binds to the first agent it
    finds (which of the two agents that is depends on the server's participant order). A
    session bound to the voice agent gets no audio and its job says so (and retries with a
    new session); one bound to the worker plays it. The voice agent never receives the
    job's audio either way."""
    faults(bind="first_agent")
    room = new_room()
    got: list[str] = []

    async def scenario() -> dict[str, Any]:
        other = rtc.Room()
        other.register_byte_stream_handler("lk.audio_stream", lambda reader, who: got.append(who))
        await other.connect(stack.livekit_url, token(stack, room, "voice-agent", kind="agent"))
        try:
            clip = str(audio.tone(tmp_path / "t.wav", seconds=1.0))
            return await asyncio.to_thread(wait, enqueue(room=room, source=clip), 240.0)
        finally:
            await other.disconnect()

    result = asyncio.run(scenario())
    assert got == []
    played = wait_ended(stack, room, 30.0)
    for session in played:
        bound_to_worker = session["bound_sender_identity"] == f"avatarq-{result['job_id']}"
        assert session["received_audio_s"] == pytest.approx(1.0 if bound_to_worker else 0.0)
    if result["status"] == "completed":
        assert played[-1]["bound_sender_identity"] == f"avatarq-{result['job_id']}"
    else:
        assert result["reason"] == "avatar_not_listening", result
        assert "listens to another participant" in result["error"]
        assert all(s["bound_sender_identity"] == "voice-agent" for s in played)
    assert len(played) == result["attempt"]


def test_wrong_livekit_secret_is_a_clear_permanent_error(stack: LocalStack) -> None:
    """A 401 from the server is a settings problem: failing at once beats retrying."""
    from avatarq.errors import LiveKitRejected
    from tasks.link import room as rooms

    bad = (
        api.AccessToken(DEV_API_KEY, "not-the-secret-at-all-0123456789abcdef")
        .with_identity("w")
        .with_grants(api.VideoGrants(room_join=True, room=new_room()))
        .to_jwt()
    )
    with pytest.raises(LiveKitRejected, match="LIVEKIT_API_SECRET") as info:
        asyncio.run(rooms.connect(stack.livekit_url, bad))
    assert info.value.permanent and info.value.reason == "livekit_rejected"
    assert bad not in str(info.value)
