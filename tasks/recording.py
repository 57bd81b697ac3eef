"""The recording hook: a recorded job's (`record`) avatar video and audio, from its first byte
to the avatar's end of playback, as an MP4 in its result. `AVATARQ_RECORDING_BACKEND` picks
what records; `local` runs tasks/recorder.py as a process of its own per job."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sys
import time
from typing import Any

from avatarq.results import Recording
from avatarq.settings import Settings
from tasks.context import HookFactory, JobHook, PlayContext, Segment
from tasks.decode import ffmpeg_binary
from tasks.link.tokens import recorder_token, ttl_for
from tasks.recording_store import destination_of, object_name

log = logging.getLogger("avatarq.recording")

#: The recorder joins the room (and subscribes to the avatar) within this; the first byte
#: waits for it.
READY_TIMEOUT_S = 10.0
#: Muxing and storing after the end mark; the job's end waits for it.
STORED_TIMEOUT_S = 120.0
#: How long a recorder that did not answer may take to exit before it is killed.
EXIT_TIMEOUT_S = 5.0


class LocalRecording(JobHook):
    """Starts the recorder once the avatar listens and waits for it (so it hears the first
    byte), marks the segment's start and end, and puts the stored recording in the play's
    context."""

    def __init__(self, play: PlayContext, settings: Settings, destination: str) -> None:
        self.play, self.settings, self.destination = play, settings, destination
        self.proc: asyncio.subprocess.Process | None = None
        self.ready = False
        self.started = False
        self.error: str | None = None

    async def on_link_ready(self) -> None:
        # Not at the claim: a job waiting for an avatar session goes back to the queue each
        # second, and would start (and stop) a recorder each time.
        job = self.play.job
        token = recorder_token(
            self.settings,
            room=job.room,
            identity=f"{job.worker_identity}-recorder",
            ttl=ttl_for(None, self.settings),
        )
        order = {
            "livekit_url": self.settings.livekit_url,
            "token": token,
            "avatar_identity": job.avatar_identity,
            "destination": self.destination,
            "name": object_name(job.job_id, self.play.attempt),
            "title": job.job_id,
            "fps": self.settings.recording_fps,
            "ffmpeg": ffmpeg_binary(self.settings),
        }
        try:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "tasks.recorder",
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            )  # fmt: skip
            self._send(order)
            async with asyncio.timeout(READY_TIMEOUT_S):
                ready = await self._answer()
            if not ready.get("ready"):
                raise RuntimeError("the recorder did not join the room")
            self.ready = True
        except (OSError, RuntimeError, TimeoutError, ValueError) as e:
            self.error = f"the recorder was not ready: {e or type(e).__name__}"
            log.warning("job %s: %s", job.job_id, self.error)
            await self._stop()

    def on_stream_start(self, segment: Segment) -> None:
        if self.proc is not None and self.ready:
            self.started = True
            self._send({"start": time.time()})

    def on_stream_end(self, segment: Segment) -> None:
        if not self.started:
            return
        ts = self.play.timestamps
        # Complete only when the avatar reported playing it all, unstopped.
        partial = self.play.control.reason is not None or ts.playback_finished is None
        self._send({"end": ts.playback_finished or time.time(), "partial": partial})

    async def on_released(self) -> None:
        if self.proc is None:
            if self.error is not None:
                self.play.recording = _failed(self.error)
            return
        if not self.started:
            await self._stop()  # nothing was played: nothing to keep
            return
        try:
            async with asyncio.timeout(STORED_TIMEOUT_S):
                answer = await self._answer()
            self.play.recording = Recording.model_validate(answer["recording"])
        except (TimeoutError, KeyError, ValueError) as e:
            self.play.recording = _failed(f"the recorder did not store the recording: {e!r}")
        await self._stop()

    def _send(self, message: dict[str, Any]) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        with contextlib.suppress(OSError):  # a recorder that died is reported by its answer
            self.proc.stdin.write(json.dumps(message).encode() + b"\n")

    async def _answer(self) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdout is not None
        line = await self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the recorder exited ({self.proc.returncode})")
        answer: dict[str, Any] = json.loads(line)
        return answer

    async def _stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            async with asyncio.timeout(EXIT_TIMEOUT_S):
                await proc.wait()
        except TimeoutError:
            proc.kill()
            await proc.wait()


def _failed(error: str) -> Recording:
    return Recording(url=None, duration=0.0, size=0, partial=True, backend="local", error=error)


def recording_hooks(settings: Settings) -> HookFactory:
    """The hook that records a job that asks for it (and does nothing for the others)."""

    def make(play: PlayContext) -> JobHook:
        try:
            destination = destination_of(play.job, settings)
        except ValueError as e:
            return _Unrecordable(play, str(e))
        if destination is None:
            return JobHook()
        return LocalRecording(play, settings, destination)

    return make


class _Unrecordable(JobHook):
    """A job that asked for a recording the worker cannot make: it plays, and its result
    says why there is no recording."""

    def __init__(self, play: PlayContext, error: str) -> None:
        self.play, self.error = play, error

    async def on_released(self) -> None:
        self.play.recording = _failed(self.error)
