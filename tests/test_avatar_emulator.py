"""The avatar emulator: HTTP contract, fault injection, playout and recording, and (inside
infra/netns-run) a real LiveKit round trip against the dev LiveKit server.

    infra/netns-run .venv/bin/pytest tests/test_avatar_emulator.py -x -q
"""

from __future__ import annotations

import asyncio
import functools
import json
import wave
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import numpy as np
import pytest
from aiohttp.test_utils import TestClient, TestServer
from livekit import api, rtc

# In-process: only where the dev stack's `emulator` extra is installed (not .venv-lk12, whose
# stack runs the emulator from .venv: docs/compatibility.md).
pytest.importorskip("livekit.agents", reason="the dev stack's emulator extra is not installed")

from livekit.agents.types import ATTRIBUTE_PUBLISH_ON_BEHALF  # noqa: E402
from livekit.agents.voice.avatar._datastream_io import (
    AUDIO_STREAM_TOPIC,
    RPC_CLEAR_BUFFER,
    RPC_PLAYBACK_FINISHED,
)

from avatarq_dev.avatar_emulator.http import API_SECRET_HEADER, Emulator, create_app
from avatarq_dev.avatar_emulator.playout import UNDERRUN_TOLERANCE_S, SegmentPlayout
from avatarq_dev.avatar_emulator.recorder import SessionRecorder
from avatarq_dev.avatar_emulator.session import TokenError, TokenInfo
from avatarq_dev.avatar_emulator.video import HEIGHT, WIDTH, MouthVideo, audio_level
from avatarq_dev.processes import python_module
from tests.netns import needs_netns

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
        changed = {"fail_next_starts": 0, "fail_status": 503, "join": False, "leave_after_s": 5.0}
        assert {k: faults[k] for k in changed} == changed
        for bad in ({"fail_status": 200}, {"fail_next_starts": -1}, {"join": 1}, {"what": 1}):
            assert (await client.post(FAULTS, json=bad)).status == 400
        await emulator.stop_all("test")

    with_client(test)


def test_cli_never_echoes_or_logs_the_license_key(tmp_path: Path) -> None:
    proc = python_module(
        "avatar-emulator",
        "avatarq_dev.avatar_emulator",
        lambda ports: ["--port", str(ports[0]), "--record-dir", str(tmp_path / "rec")],
        ports=["tcp"],
        env={"AVALUMA_LICENSE_KEY": LICENSE_KEY},
        log_dir=tmp_path,
    )

    async def requests() -> list[str]:
        base = f"http://127.0.0.1:{proc.port}"
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
    from avatarq_dev.avatar_emulator import main

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


# -- a real room: dev LiveKit server + emulator subprocess + an in-test sender ----------------

STEP_TIMEOUT = 20.0
RATE = 16000
CHUNK_S = 0.1
SEND_LEAD_S = 0.3  # the sender stays this far ahead of real time, as a real worker does


@dataclass(frozen=True)
class EmulatorProcess:
    base_url: str
    record_dir: Path
    log_path: Path


@pytest.fixture(scope="module")
def emulator_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmulatorProcess]:
    workdir = tmp_path_factory.mktemp("avatar-emulator")
    proc = python_module(
        "avatar-emulator",
        "avatarq_dev.avatar_emulator",
        lambda ports: [
            "--host",
            "127.0.0.1",
            "--port",
            str(ports[0]),
            "--license-key",
            LICENSE_KEY,
            "--record-dir",
            str(workdir / "rec"),
        ],
        ports=["tcp"],
        log_dir=workdir,
    )
    with proc:
        yield EmulatorProcess(f"http://127.0.0.1:{proc.port}", workdir / "rec", proc.log_path)


def tone(seconds: float, freq: float, seed: int) -> bytes:
    """A known, non-trivial s16 mono signal (tone plus seeded noise)."""
    t = np.arange(int(seconds * RATE)) / RATE
    noise = np.random.default_rng(seed).normal(0, 500, t.size)
    return (np.sin(2 * np.pi * freq * t) * 8000 + noise).astype(np.int16).tobytes()


async def wait(aw: Awaitable[T], timeout: float = STEP_TIMEOUT) -> T:
    return await asyncio.wait_for(aw, timeout)


async def until(predicate: Callable[[], bool], what: str, timeout: float = STEP_TIMEOUT) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise TimeoutError(what)
        await asyncio.sleep(0.05)


async def stream_segment(
    sender: rtc.Room,
    pcm: bytes,
    *,
    name: str,
    on_progress: Callable[[float], Awaitable[bool]] | None = None,
) -> None:
    """Write `pcm` as one lk.audio_stream segment, paced like a worker (real time + lead).

    `on_progress(seconds_sent)` may return True to stop sending (the stream is still closed).
    """
    writer = await wait(
        sender.local_participant.stream_bytes(
            name,
            topic=AUDIO_STREAM_TOPIC,
            destination_identities=[AVATAR_IDENTITY],
            attributes={"sample_rate": str(RATE), "num_channels": "1"},
        )
    )
    loop = asyncio.get_running_loop()
    start = loop.time()
    chunk_bytes = int(CHUNK_S * RATE) * 2
    for i, offset in enumerate(range(0, len(pcm), chunk_bytes)):
        await wait(writer.write(pcm[offset : offset + chunk_bytes]))
        sent_s = (i + 1) * CHUNK_S
        if on_progress is not None and await on_progress(sent_s):
            break
        await asyncio.sleep(max(0.0, start + sent_s - SEND_LEAD_S - loop.time()))
    await wait(writer.aclose())


@pytest.mark.netns
@needs_netns
@pytest.mark.timeout(120)
def test_room_round_trip(livekit_server: Any, emulator_process: EmulatorProcess) -> None:
    if livekit_server.server == "official":
        # Known gap, left open: on the official server this test's own raw sender trips the
        # SDK's FFI assertion in ByteStreamWriter.aclose (livekit 1.1.21) after its
        # clear_buffer. The emulator's protocol there is covered through the worker by
        # tests/test_fidelity.py and tests/test_pipeline_e2e.py.
        pytest.skip("raw-sender round trip runs on the embedded server only (see comment)")
    room = "emu-round-trip"
    server_token = functools.partial(
        make_token, room=room, key=livekit_server.api_key, secret=livekit_server.api_secret
    )
    seg1, seg2, seg3, seg4 = (
        tone(2.0, 440, 1),
        tone(1.0, 660, 2),
        tone(3.0, 220, 3),
        tone(0.5, 880, 4),
    )

    async def body() -> None:
        sender = rtc.Room()
        await wait(sender.connect(livekit_server.url, server_token(SENDER_IDENTITY, sender=None)))
        finished: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

        def on_playback_finished(data: rtc.RpcInvocationData) -> str:
            assert data.caller_identity == AVATAR_IDENTITY
            finished.put_nowait(json.loads(data.payload))
            return "ok"

        sender.local_participant.register_rpc_method(RPC_PLAYBACK_FINISHED, on_playback_finished)
        base = emulator_process.base_url
        async with aiohttp.ClientSession() as http:
            # Media flows on the official server only: there the emulator is an AvatarRunner
            # (video once its audio is subscribed, which auto_subscribe does).
            publish = "runner" if livekit_server.server == "official" else "video_only"
            await http.post(base + FAULTS, json={"publish": publish})
            body = start_body(livekit_url=livekit_server.url, livekit_token=server_token())
            async with http.post(base + START, json=body, headers=AUTH) as r:
                assert r.status == 200, await r.text()
                session_id = (await r.json())["session_id"]

            def avatar_video_published() -> bool:
                avatar = sender.remote_participants.get(AVATAR_IDENTITY)
                return avatar is not None and any(
                    pub.kind == rtc.TrackKind.KIND_VIDEO
                    for pub in avatar.track_publications.values()
                )

            await until(avatar_video_published, "avatar video track")
            avatar = sender.remote_participants[AVATAR_IDENTITY]
            assert avatar.kind == rtc.ParticipantKind.PARTICIPANT_KIND_AGENT

            # Two complete segments: positions are the exact audio lengths.
            for pcm, seconds in ((seg1, 2.0), (seg2, 1.0)):
                await stream_segment(sender, pcm, name=f"seg-{seconds}")
                event = await wait(finished.get(), 10)
                assert event["playback_position"] == pytest.approx(seconds)
                assert event["interrupted"] is False

            # clear_buffer one second into a 3 s segment interrupts it where playback was.
            async def clear_after_1s(sent_s: float) -> bool:
                if sent_s < 1.0:
                    return False
                reply = await wait(
                    sender.local_participant.perform_rpc(
                        destination_identity=AVATAR_IDENTITY, method=RPC_CLEAR_BUFFER, payload=""
                    )
                )
                assert reply == "ok"
                return True

            await stream_segment(sender, seg3, name="seg-cleared", on_progress=clear_after_1s)
            event = await wait(finished.get(), 10)
            assert event["interrupted"] is True
            cleared_at = event["playback_position"]
            assert 0.4 < cleared_at < 1.4

            # The session keeps working after a clear.
            await stream_segment(sender, seg4, name="seg-after-clear")
            event = await wait(finished.get(), 10)
            assert event["playback_position"] == pytest.approx(0.5)
            assert event["interrupted"] is False
            assert finished.empty()

            # The worker leaving ends the session (after the ~1 s grace period).
            await wait(sender.disconnect())

            async def session() -> dict[str, Any]:
                async with http.get(f"{base}/v1/sessions/{session_id}") as r:
                    return dict(await r.json())

            deadline = asyncio.get_running_loop().time() + 10
            while (info := await session())["state"] != "stopped":
                assert asyncio.get_running_loop().time() < deadline, info
                await asyncio.sleep(0.2)

        assert info["stop_reason"] == "room_empty"
        assert info["sender_identity"] == SENDER_IDENTITY
        segments = info["segments"]
        assert [s["interrupted"] for s in segments] == [False, False, True, False]
        assert [s["received_s"] for s in segments][:2] == [2.0, 1.0]
        assert segments[3]["received_s"] == 0.5
        assert segments[2]["playback_position"] == pytest.approx(cleared_at)
        assert segments[2]["playback_position"] <= segments[2]["received_s"]
        assert info["underruns"] == 0, segments
        for s in segments:
            assert s["first_frame_at"] <= s["last_frame_at"] <= s["playback_finished_at"]

        # The WAV is exactly what was received: seg1, seg2, the part of seg3 before the
        # clear, seg4.
        with wave.open(info["wav_path"], "rb") as w:
            assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (RATE, 1, 2)
            audio = w.readframes(w.getnframes())
        seg3_bytes = segments[2]["received_samples"] * 2
        assert audio == seg1 + seg2 + seg3[:seg3_bytes] + seg4
        sidecar = json.loads(Path(info["json_path"]).read_text())
        assert sidecar["segments"] == segments

    run(body(), timeout=100)


@pytest.mark.netns
@needs_netns
@pytest.mark.timeout(120)
def test_room_leave_fault_and_stop_mid_stream(
    livekit_server: Any, emulator_process: EmulatorProcess
) -> None:
    base = emulator_process.base_url

    async def leaves_mid_stream(
        http: aiohttp.ClientSession, room: str, *, with_sender_attribute: bool, stop: bool
    ) -> dict[str, Any]:
        """Stream a 5 s segment; the avatar leaves after ~1 s (fault, or stop-avatar)."""
        token = functools.partial(
            make_token, room=room, key=livekit_server.api_key, secret=livekit_server.api_secret
        )
        sender = rtc.Room()
        await wait(sender.connect(livekit_server.url, token(SENDER_IDENTITY, sender=None)))
        try:
            # Without lk.publish_on_behalf the avatar takes the first agent participant.
            sender_attr = SENDER_IDENTITY if with_sender_attribute else None
            body = start_body(
                livekit_url=livekit_server.url, livekit_token=token(sender=sender_attr)
            )
            async with http.post(base + START, json=body, headers=AUTH) as r:
                assert r.status == 200, await r.text()
                session_id = (await r.json())["session_id"]
            await until(
                lambda: any(
                    pub.kind == rtc.TrackKind.KIND_VIDEO
                    for p in sender.remote_participants.values()
                    for pub in p.track_publications.values()
                ),
                "avatar video track",
            )

            async def leave_after_1s(sent_s: float) -> bool:
                if stop and sent_s >= 1.0 + SEND_LEAD_S:
                    async with http.post(
                        base + STOP, json={"session_id": session_id}, headers=AUTH
                    ) as r:
                        assert r.status == 200
                return AVATAR_IDENTITY not in sender.remote_participants

            await stream_segment(sender, tone(5.0, 330, 5), name="long", on_progress=leave_after_1s)
            await until(lambda: AVATAR_IDENTITY not in sender.remote_participants, "avatar left")
            async with http.get(f"{base}/v1/sessions/{session_id}") as r:
                return dict(await r.json())
        finally:
            await wait(sender.disconnect())

    async def body() -> None:
        async with aiohttp.ClientSession() as http:
            await http.post(base + FAULTS, json={"leave_after_s": 1.0})
            try:
                left = await leaves_mid_stream(
                    http, "emu-leave", with_sender_attribute=True, stop=False
                )
            finally:
                await http.post(base + FAULTS, json={"leave_after_s": None})
            stopped = await leaves_mid_stream(
                http, "emu-stop", with_sender_attribute=False, stop=True
            )
        for info, reason in ((left, "fault_leave_after"), (stopped, "stop_request")):
            assert info["state"] == "stopped" and info["stop_reason"] == reason
            [segment] = info["segments"]
            assert segment["interrupted"] is True
            assert 0.3 < segment["playback_position"] < 2.0
            assert segment["received_s"] < 5.0
            with wave.open(info["wav_path"], "rb") as w:
                assert w.getnframes() == segment["received_samples"]
        assert stopped["sender_identity"] is None

    run(body(), timeout=100)
