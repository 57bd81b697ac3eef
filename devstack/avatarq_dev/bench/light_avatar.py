"""A light avatar server for the benchmark's load: the emulator's HTTP start/stop API and the
worker-facing protocol, without livekit-agents' receiver, video rendering or WAV recording.

Its playout is arithmetic rather than a timer per frame, so a receiver costs little more than
the SDK's own work. How to run it, what it answers and how it spreads sessions over processes:
docs/performance.md (the light receivers)."""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import itertools
import json
import logging
import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from livekit import rtc

from avatarq_dev.avatar_emulator.playout import SegmentPlayout
from avatarq_dev.avatar_emulator.recorder import SegmentRecord

log = logging.getLogger("avatarq.bench.light_avatar")

START_PATH = "/v1/livekit/start-avatar"
STOP_PATH = "/v1/livekit/stop-avatar"
LICENSE_HEADER = "api-secret"
AUDIO_STREAM_TOPIC = "lk.audio_stream"
RPC_PLAYBACK_FINISHED = "lk.playback_finished"
RPC_CLEAR_BUFFER = "lk.clear_buffer"
RPC_AGENT_STATE_CHANGED = "agent_state_changed"
PUBLISH_ON_BEHALF = "lk.publish_on_behalf"
REPORT_TIMEOUT_S = 5.0
CHILD_START_TIMEOUT_S = 30.0


def token_claims(token: str) -> tuple[str, str | None]:
    """(identity, sender identity) from a LiveKit JWT; the server verifies it, we only read."""
    payload = token.split(".")[1]
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    sender = (claims.get("attributes") or {}).get(PUBLISH_ON_BEHALF)
    return str(claims["sub"]), sender or None


class LightSession:
    def __init__(self, session_id: str, url: str, token: str, record_dir: Path | None) -> None:
        self.session_id = session_id
        self.identity, self.sender = token_claims(token)
        self._url, self._token = url, token
        self._path = record_dir / f"{session_id}.json" if record_dir else None
        self.room = rtc.Room()
        self.segments: list[SegmentRecord] = []
        self._playout: SegmentPlayout | None = None
        self._playing: SegmentRecord | None = None
        self._finish: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self.closed = asyncio.Event()

    async def start(self) -> None:
        room = self.room
        room.register_byte_stream_handler(AUDIO_STREAM_TOPIC, self._on_stream)
        room.on("participant_disconnected", self._on_left)
        await room.connect(self._url, self._token, rtc.RoomOptions(auto_subscribe=False))
        lp = room.local_participant
        lp.register_rpc_method(RPC_CLEAR_BUFFER, self._on_clear_buffer)
        lp.register_rpc_method(RPC_AGENT_STATE_CHANGED, lambda _data: "ok")
        source = rtc.VideoSource(16, 16)
        track = rtc.LocalVideoTrack.create_video_track("avatar_video", source)
        await lp.publish_track(track, rtc.TrackPublishOptions(source=rtc.TrackSource.SOURCE_CAMERA))
        source.capture_frame(rtc.VideoFrame(16, 16, rtc.VideoBufferType.RGBA, bytes(16 * 16 * 4)))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _on_left(self, participant: rtc.RemoteParticipant) -> None:
        # Avatar servers end a session once the agent they speak for has left.
        if participant.identity == self.sender:
            self._spawn(self.stop())

    def _on_stream(self, reader: rtc.ByteStreamReader, identity: str) -> None:
        if identity == self.sender:
            self._spawn(self._receive(reader))

    async def _receive(self, reader: rtc.ByteStreamReader) -> None:
        attrs = reader.info.attributes or {}
        rate, channels = int(attrs.get("sample_rate", 16000)), int(attrs.get("num_channels", 1))
        loop = asyncio.get_running_loop()
        seg: SegmentRecord | None = None
        playout: SegmentPlayout | None = None
        bytes_per_frame = 2 * channels
        async for chunk in reader:
            if seg is None or playout is None:
                # The timeline starts with the first audio, as the emulator's does.
                seg = SegmentRecord(len(self.segments), rate, channels, first_frame_at=time.time())
                self.segments.append(seg)
                playout = SegmentPlayout(rate, start=loop.time(), underruns=seg.underruns)
                self._playing, self._playout = seg, playout
            if seg.finished:  # cleared: drain the rest of the stream unplayed
                continue
            samples = len(chunk) // bytes_per_frame
            playout.schedule(samples, loop.time())
            now = time.time()
            seg.received_samples += samples
            seg.last_frame_at = now
            elapsed = now - seg.first_frame_at
            ahead, second = seg.received_s - elapsed, int(elapsed)
            if second < len(seg.ahead_s):
                seg.ahead_s[second] = max(seg.ahead_s[second], ahead)
            else:  # the emulator's rule: seconds without a chunk repeat the last value
                seg.ahead_s.extend([ahead] * (second + 1 - len(seg.ahead_s)))
        if seg is not None and playout is not None and not seg.finished:
            await asyncio.sleep(max(0.0, playout.ends_at - loop.time()))
            if not seg.finished:
                await self._report(seg, playout.scheduled_s, interrupted=False)

    def _on_clear_buffer(self, data: rtc.RpcInvocationData) -> str:
        if data.caller_identity != self.sender:
            return "reject"
        seg, playout = self._playing, self._playout
        if seg is not None and playout is not None and not seg.finished:
            position = playout.position(asyncio.get_running_loop().time())
            self._spawn(self._report(seg, position, interrupted=True))
        return "ok"

    async def _report(self, seg: SegmentRecord, position: float, *, interrupted: bool) -> None:
        seg.finish(position=position, interrupted=interrupted, at=time.time())
        self._save()
        payload = json.dumps({"playback_position": position, "interrupted": interrupted})
        with contextlib.suppress(Exception):  # the sender may be gone: nothing to tell
            await self.room.local_participant.perform_rpc(
                destination_identity=self.sender or "",
                method=RPC_PLAYBACK_FINISHED,
                payload=payload,
                response_timeout=REPORT_TIMEOUT_S,
            )

    def _save(self) -> None:
        if self._path is None:
            return
        doc = {"session_id": self.session_id, "segments": [s.to_json() for s in self.segments]}
        tmp = self._path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(doc))
        os.replace(tmp, self._path)

    async def stop(self) -> None:
        if self.closed.is_set():
            return
        self.closed.set()
        for task in list(self._tasks):
            if task is not asyncio.current_task():
                task.cancel()
        self._save()
        await self.room.disconnect()


def _check_license(request: web.Request, key: str) -> None:
    if request.headers.get(LICENSE_HEADER) != key:
        raise web.HTTPForbidden(text="invalid license key")


def child_app(index: int, license_key: str, record_dir: Path | None) -> web.Application:
    sessions: dict[str, LightSession] = {}

    async def start(request: web.Request) -> web.Response:
        _check_license(request, license_key)
        body = await request.json()
        session_id = f"sess_{index}_{uuid.uuid4().hex[:12]}"
        session = LightSession(session_id, body["livekit_url"], body["livekit_token"], record_dir)
        sessions[session_id] = session
        # Join in the background, as real servers do: the answer does not wait for the room.
        task = asyncio.get_running_loop().create_task(session.start())
        task.add_done_callback(lambda t: t.cancelled() or t.exception())
        request.app.setdefault("tasks", set()).add(task)
        task.add_done_callback(request.app["tasks"].discard)
        return web.json_response(
            {
                "session_id": session_id,
                "status": "started",
                "avatar_participant_identity": session.identity,
            }
        )

    async def stop(request: web.Request) -> web.Response:
        _check_license(request, license_key)
        session = sessions.pop((await request.json()).get("session_id", ""), None)
        if session is None:
            return web.json_response({"error": "session not found"}, status=404)
        await session.stop()
        return web.json_response({"status": "stopped"})

    async def on_shutdown(app: web.Application) -> None:
        await asyncio.gather(*(s.stop() for s in sessions.values()), return_exceptions=True)

    app = web.Application()
    app.router.add_post(START_PATH, start)
    app.router.add_post(STOP_PATH, stop)
    app.router.add_get("/healthz", lambda _r: _ok())
    app.on_shutdown.append(on_shutdown)
    return app


async def _ok() -> web.Response:
    return web.json_response({"status": "healthy"})


def front_app(license_key: str, children: list[str]) -> web.Application:
    """Forwards starts round-robin and stops to the child named by the session id."""
    turn = itertools.cycle(range(len(children)))
    client: dict[str, aiohttp.ClientSession] = {}

    async def forward(request: web.Request, child: str) -> web.Response:
        if "c" not in client:
            client["c"] = aiohttp.ClientSession()
        headers = {LICENSE_HEADER: request.headers.get(LICENSE_HEADER, "")}
        async with client["c"].post(
            child + request.path, data=await request.read(), headers=headers
        ) as answer:
            return web.Response(
                body=await answer.read(), status=answer.status, content_type="application/json"
            )

    async def start(request: web.Request) -> web.Response:
        return await forward(request, children[next(turn)])

    async def stop(request: web.Request) -> web.Response:
        session_id = str((await request.json()).get("session_id", ""))
        parts = session_id.split("_")
        if len(parts) != 3 or not parts[1].isdigit() or int(parts[1]) >= len(children):
            return web.json_response({"error": "session not found"}, status=404)
        return await forward(request, children[int(parts[1])])

    async def on_cleanup(app: web.Application) -> None:
        if "c" in client:
            await client["c"].close()

    app = web.Application()
    app.router.add_post(START_PATH, start)
    app.router.add_post(STOP_PATH, stop)
    app.router.add_get("/healthz", lambda _r: _ok())
    app.on_cleanup.append(on_cleanup)
    return app


def _wait_serving(url: str, child: subprocess.Popen[bytes]) -> None:
    """Until the child answers: its socket accepts connections from the start."""
    deadline = time.monotonic() + CHILD_START_TIMEOUT_S
    while time.monotonic() < deadline and child.poll() is None:
        with contextlib.suppress(OSError), urllib.request.urlopen(url + "/healthz", timeout=1):
            return
        time.sleep(0.1)
    raise SystemExit(f"light avatar child at {url} did not start")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, help="the front's port")
    p.add_argument("--license-key", required=True)
    p.add_argument("--record-dir", type=Path)
    p.add_argument("--processes", type=int, default=4)
    p.add_argument("--child", type=int, help=argparse.SUPPRESS)  # index of a child process
    p.add_argument("--child-fd", type=int, help=argparse.SUPPRESS)  # its inherited socket
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.record_dir:
        args.record_dir.mkdir(parents=True, exist_ok=True)
    if args.child is not None:
        app = child_app(args.child, args.license_key, args.record_dir)
        sock = socket.socket(fileno=args.child_fd)
        web.run_app(app, sock=sock, access_log=None, print=None)
        return 0
    if args.port is None:
        p.error("--port is required")
    base = [sys.executable, "-m", "avatarq_dev.bench.light_avatar", "--host", args.host]
    base += ["--license-key", args.license_key]
    if args.record_dir:
        base += ["--record-dir", str(args.record_dir)]
    children, urls = [], []
    for i in range(args.processes):
        # Listening before the child exists, which inherits it: no port number waits for a
        # bind. Closed here once the child holds it, so a dead child's port refuses.
        with socket.create_server((args.host, 0)) as sock:
            fd = sock.fileno()
            children.append(
                subprocess.Popen([*base, "--child", str(i), "--child-fd", str(fd)], pass_fds=[fd])
            )
            urls.append(f"http://{args.host}:{sock.getsockname()[1]}")
    try:
        for url, child in zip(urls, children, strict=True):
            _wait_serving(url, child)
        app = front_app(args.license_key, urls)
        web.run_app(app, host=args.host, port=args.port, access_log=None, print=None)
    finally:
        for child in children:
            child.terminate()
        for child in children:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(5)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
