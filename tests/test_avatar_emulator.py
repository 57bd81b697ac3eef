"""The avatar emulator: HTTP contract, fault injection, playout and recording, and (inside
infra/netns-run) a real LiveKit round trip against the dev LiveKit server.

    infra/netns-run .venv/bin/pytest tests/test_avatar_emulator.py -x -q
"""

from __future__ import annotations

import asyncio
import json
import wave
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import numpy as np
import pytest
from aiohttp.test_utils import TestClient, TestServer
from livekit import api, rtc
from livekit.agents.types import ATTRIBUTE_PUBLISH_ON_BEHALF

from avatarq.dev.avatar_emulator.http import API_SECRET_HEADER, Emulator, create_app
from avatarq.dev.avatar_emulator.playout import UNDERRUN_TOLERANCE_S, SegmentPlayout
from avatarq.dev.avatar_emulator.recorder import SessionRecorder
from avatarq.dev.avatar_emulator.session import TokenError, TokenInfo
from avatarq.dev.avatar_emulator.video import HEIGHT, WIDTH, MouthVideo, audio_level
from avatarq.dev.processes import free_port, python_module, tcp_ready

T = TypeVar("T")
LICENSE_KEY = "lic-test-7f3a9c"
START = "/v1/livekit/start-avatar"
STOP = "/v1/livekit/stop-avatar"
FAULTS = "/_emulator/faults"
ROOM = "emu-room"
AVATAR_IDENTITY = "avatar-test"
SENDER_IDENTITY = "worker-test"


def make_token(
    identity: str = AVATAR_IDENTITY,
    *,
    room: str = ROOM,
    sender: str | None = SENDER_IDENTITY,
    key: str = "devkey",
    secret: str = "avatar-emulator-test-secret-0123456789",
    kind: str = "agent",
) -> str:
    at = (
        api.AccessToken(key, secret)
        .with_identity(identity)
        .with_kind(kind)  # type: ignore[arg-type]
        .with_grants(api.VideoGrants(room_join=True, room=room))
    )
    if sender is not None:
        at = at.with_attributes({ATTRIBUTE_PUBLISH_ON_BEHALF: sender})
    return at.to_jwt()


def start_body(**overrides: Any) -> dict[str, Any]:
    body = {
        "livekit_url": "ws://127.0.0.1:1",
        "livekit_token": make_token(),
        "avaluma_key": LICENSE_KEY,
        "avaluma_avatar_id": "test",
    }
    body.update(overrides)
    return body


AUTH = {API_SECRET_HEADER: LICENSE_KEY}


def run(coro: Awaitable[T], timeout: float = 30.0) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(bounded())


def with_client(
    test: Callable[[TestClient[Any, Any], Emulator], Awaitable[None]],
    record_dir: Path | None = None,
) -> None:
    async def main() -> None:
        emulator = Emulator(LICENSE_KEY, record_dir)
        async with TestClient(TestServer(create_app(emulator))) as client:
            await test(client, emulator)

    run(main())


# -- HTTP contract (no room needed) ----------------------------------------------------------


def test_start_requires_the_license_key() -> None:
    async def test(client: TestClient[Any, Any], emulator: Emulator) -> None:
        r = await client.post(START, json=start_body())
        assert r.status == 401
        assert (await r.json())["code"] == "MISSING_API_SECRET"
        r = await client.post(START, json=start_body(), headers={API_SECRET_HEADER: "nope"})
        assert r.status == 403
        assert (await r.json())["code"] == "INVALID_LICENSE"
        r = await client.post(STOP, json={"session_id": "x"})
        assert r.status == 401
        assert not emulator.sessions

    with_client(test)


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"livekit_url": None}, "MISSING_PARAMETER"),
        ({"livekit_token": None}, "MISSING_PARAMETER"),
        ({"avaluma_key": None}, "MISSING_PARAMETER"),
        ({"avaluma_avatar_id": None}, "MISSING_PARAMETER"),
        ({"avaluma_avatar_id": 7}, "INVALID_PARAMETER"),
        ({"livekit_url": "ftp://x"}, "INVALID_PARAMETER"),
        ({"livekit_token": "not-a-jwt"}, "INVALID_PARAMETER"),
        ({"livekit_token": "a.b.c"}, "INVALID_PARAMETER"),
    ],
)
def test_start_rejects_invalid_bodies(body: dict[str, Any], code: str) -> None:
    request = {k: v for k, v in start_body(**body).items() if v is not None}

    async def test(client: TestClient[Any, Any], emulator: Emulator) -> None:
        r = await client.post(START, json=request, headers=AUTH)
        assert r.status == 400
        answer = await r.json()
        assert answer["code"] == code and answer["error"]
        assert not emulator.sessions

    with_client(test)


def test_start_rejects_non_json_and_wrong_body_key() -> None:
    async def test(client: TestClient[Any, Any], emulator: Emulator) -> None:
        r = await client.post(START, data=b"{nope", headers=AUTH)
        assert r.status == 400
        r = await client.post(START, json=[1, 2], headers=AUTH)
        assert r.status == 400
        r = await client.post(START, json=start_body(avaluma_key="other"), headers=AUTH)
        assert r.status == 403

    with_client(test)


def test_start_answers_then_stop_and_inspect() -> None:
    async def test(client: TestClient[Any, Any], emulator: Emulator) -> None:
        # join=false keeps this test away from any room.
        assert (await client.post(FAULTS, json={"join": False})).status == 200
        r = await client.post(START, json=start_body(), headers=AUTH)
        assert r.status == 200
        answer = await r.json()
        assert answer["status"] == "started"
        assert answer["avatar_participant_identity"] == AVATAR_IDENTITY
        session_id = answer["session_id"]

        r = await client.get(f"/v1/sessions/{session_id}")
        info = await r.json()
        assert info["state"] == "starting"
        assert info["sender_identity"] == SENDER_IDENTITY
        assert info["room"] == ROOM
        assert info["segments"] == [] and info["received_audio_s"] == 0

        health = await (await client.get("/healthz")).json()
        assert health["active_sessions"] == 1

        r = await client.post(STOP, json={"session_id": session_id}, headers=AUTH)
        assert r.status == 200 and await r.json() == {"status": "stopped"}
        info = await (await client.get(f"/v1/sessions/{session_id}")).json()
        assert info["state"] == "stopped" and info["stop_reason"] == "stop_request"

        r = await client.post(STOP, json={"session_id": "sess_unknown"}, headers=AUTH)
        assert r.status == 404
        assert (await client.get("/v1/sessions/sess_unknown")).status == 404
        assert (await client.post(STOP, json={}, headers=AUTH)).status == 400

    with_client(test)


def test_fault_injection_fails_the_next_starts() -> None:
    async def test(client: TestClient[Any, Any], emulator: Emulator) -> None:
        r = await client.post(FAULTS, json={"fail_next_starts": 2, "fail_status": 503})
        assert (await r.json())["fail_next_starts"] == 2
        await client.post(FAULTS, json={"join": False, "leave_after_s": 5})
        statuses = []
        for _ in range(3):
            statuses.append((await client.post(START, json=start_body(), headers=AUTH)).status)
        assert statuses == [503, 503, 200]
        faults = await (await client.get(FAULTS)).json()
        assert faults == {
            "fail_next_starts": 0,
            "fail_status": 503,
            "join": False,
            "leave_after_s": 5.0,
        }
        for bad in ({"fail_status": 200}, {"fail_next_starts": -1}, {"join": 1}, {"what": 1}):
            assert (await client.post(FAULTS, json=bad)).status == 400
        await emulator.stop_all("test")

    with_client(test)


def test_cli_never_echoes_or_logs_the_license_key(tmp_path: Path) -> None:
    port = free_port()
    proc = python_module(
        "avatar-emulator",
        "avatarq.dev.avatar_emulator",
        ["--host", "127.0.0.1", "--port", str(port), "--record-dir", str(tmp_path / "rec")],
        ready=tcp_ready("127.0.0.1", port),
        env={"AVALUMA_LICENSE_KEY": LICENSE_KEY},
        log_dir=tmp_path,
    )

    async def requests() -> list[str]:
        base = f"http://127.0.0.1:{port}"
        texts = []
        async with aiohttp.ClientSession() as http:
            await http.post(base + FAULTS, json={"join": False})
            for headers, body in [
                ({API_SECRET_HEADER: LICENSE_KEY + "x"}, start_body()),
                (AUTH, start_body(avaluma_key=LICENSE_KEY[:-1])),
                (AUTH, start_body(livekit_url=None)),
                (AUTH, start_body()),
            ]:
                async with http.post(base + START, json=body, headers=headers) as r:
                    texts.append(await r.text())
            session_id = json.loads(texts[-1])["session_id"]
            async with http.get(f"{base}/v1/sessions/{session_id}") as r:
                texts.append(await r.text())
            async with http.post(base + STOP, json={"session_id": session_id}, headers=AUTH) as r:
                assert r.status == 200
        return texts

    with proc:
        texts = run(requests())
    log = proc.log_path.read_text()
    assert "started" in log and "stopped" in log
    for text in [*texts, log]:
        assert LICENSE_KEY not in text
        assert LICENSE_KEY[:-1] not in text


def test_cli_requires_a_license_key(monkeypatch: pytest.MonkeyPatch) -> None:
    from avatarq.dev.avatar_emulator import main

    monkeypatch.delenv("AVALUMA_LICENSE_KEY", raising=False)
    assert main(["--port", "0"]) == 2


# -- token, playout, recording, video (plain data) -------------------------------------------


def test_token_info_reads_identity_room_and_sender() -> None:
    info = TokenInfo.parse(make_token())
    assert info == TokenInfo(AVATAR_IDENTITY, ROOM, SENDER_IDENTITY)
    assert TokenInfo.parse(make_token(sender=None)).sender_identity is None
    with pytest.raises(TokenError):
        TokenInfo.parse("x.e30.y")  # payload {} has no sub


def test_playout_on_time_frames_have_no_underrun() -> None:
    p = SegmentPlayout(16000, start=100.0)
    ends = [p.schedule(1600, now) for now in (100.0, 100.1, 100.2 + UNDERRUN_TOLERANCE_S / 2)]
    assert ends == pytest.approx([100.1, 100.2, 100.3])
    assert p.underruns == []
    assert p.position(100.15) == pytest.approx(0.15)
    assert p.position(99.0) == 0.0
    assert p.position(105.0) == pytest.approx(0.3)  # never past what was scheduled


def test_playout_late_frame_is_an_underrun_and_shifts_the_clock() -> None:
    p = SegmentPlayout(16000, start=0.0)
    p.schedule(1600, 0.0)
    assert p.schedule(1600, 0.35) == pytest.approx(0.45)
    [underrun] = p.underruns
    assert underrun.at_s == pytest.approx(0.1)
    assert underrun.duration_s == pytest.approx(0.25)
    # Played audio stays continuous: the position counts audio, not wall time.
    assert p.position(0.40) == pytest.approx(0.15)
    assert p.schedule(1600, 0.45) == pytest.approx(0.55)
    assert len(p.underruns) == 1


def test_recorder_writes_wav_incrementally_and_sidecar(tmp_path: Path) -> None:
    rec = SessionRecorder(tmp_path, "s1")
    pcm = np.arange(-8000, 8000, 5, dtype=np.int16).tobytes()
    half = len(pcm) // 2
    seg = rec.begin_segment(16000, 1, at=1.0)
    rec.write(seg, pcm[:half], half // 2, at=1.1)
    assert rec.wav_path is not None and rec.json_path is not None
    with wave.open(str(rec.wav_path), "rb") as w:  # valid while still being written
        assert w.getnframes() == half // 2
    rec.write(seg, pcm[half:], (len(pcm) - half) // 2, at=1.2)
    seg.finish(position=seg.received_s, interrupted=False, at=1.3)
    odd = rec.begin_segment(24000, 1, at=2.0)
    rec.write(odd, b"\x01\x00" * 10, 10, at=2.0)
    rec.save({"segments": [s.to_json() for s in rec.segments]})
    rec.close()

    with wave.open(str(rec.wav_path), "rb") as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (16000, 1, 2)
        assert w.readframes(w.getnframes()) == pcm
    doc = json.loads(rec.json_path.read_text())
    first, second = doc["segments"]
    assert first["received_samples"] == len(pcm) // 2 and first["interrupted"] is False
    assert first["first_frame_at"] == 1.0 and first["last_frame_at"] == 1.2
    assert second["in_wav"] is False and second["interrupted"] is None


def test_recorder_without_dir_only_counts(tmp_path: Path) -> None:
    rec = SessionRecorder(None, "s2")
    seg = rec.begin_segment(16000, 1, at=0.0)
    rec.write(seg, b"\x00\x00" * 160, 160, at=0.0)
    rec.save({"x": 1})
    rec.close()
    assert seg.received_s == pytest.approx(0.01)
    assert list(tmp_path.iterdir()) == []


def test_video_mouth_follows_level() -> None:
    video = MouthVideo()
    closed, opened = video.render(0.0), video.render(1.0)
    assert (closed.width, closed.height) == (WIDTH, HEIGHT)
    assert closed.type == rtc.VideoBufferType.RGBA
    assert bytes(closed.data) != bytes(opened.data)
    assert bytes(video.render(0.0).data) == bytes(closed.data)
    assert audio_level(np.zeros(160, np.int16)) == 0.0
    assert audio_level(np.full(160, 20000, np.int16)) == 1.0
