"""The recording hooks: a recorded job's (`record`) avatar video and audio, from its first
byte to the avatar's end of playback, as an MP4 in its result, with the job's captions as a
WebVTT beside it. `AVATARQ_RECORDING_BACKEND` picks what records: `local` runs tasks/recorder.py
as a process of its own per job, `egress` asks LiveKit Egress (tasks/egress.py)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sys
import time
from typing import Any

from avatarq.captions import webvtt_for
from avatarq.results import Recording
from avatarq.settings import Settings
from tasks.context import HookFactory, JobHook, PlayContext, Segment
from tasks.decode import ffmpeg_binary
from tasks.egress import EgressError, EgressRecorder, EgressRecording
from tasks.link.tokens import recorder_token, ttl_for
from tasks.recording_store import (
    StoreError,
    captions_name,
    destination_of,
    egress_filepath,
    object_name,
    store_captions,
)

log = logging.getLogger("avatarq.recording")

#: The recorder joins the room (and subscribes to the avatar) within this; the first byte
#: waits for it.
READY_TIMEOUT_S = 10.0
#: Muxing and storing after the end mark; the job's end waits for it.
STORED_TIMEOUT_S = 120.0
#: How long a recorder that did not answer may take to exit before it is killed.
EXIT_TIMEOUT_S = 5.0


class RecordingHook(JobHook):
    """What every backend shares: the segment it records, whether the job played all of it,
    and the WebVTT stored beside the MP4 its backend stored (`_stored`)."""

    backend = ""

    def __init__(self, play: PlayContext, settings: Settings, destination: str) -> None:
        self.play, self.settings, self.destination = play, settings, destination
        self.name = object_name(play.job.job_id, play.attempt)
        self.segment: Segment | None = None
        self.partial = True
        self.error: str | None = None

    def on_stream_start(self, segment: Segment) -> None:
        self.segment = segment

    def on_stream_end(self, segment: Segment) -> None:
        # Complete only when the avatar reported playing it all, unstopped.
        ts = self.play.timestamps
        self.partial = self.play.control.reason is not None or ts.playback_finished is None

    async def on_released(self) -> None:
        recording = await self._stored()
        if recording is not None and recording.url is not None:
            recording = await self._with_captions(recording)
        self.play.recording = recording

    async def _stored(self) -> Recording | None:
        """The backend's stored recording (None: nothing was played, nothing to keep)."""
        raise NotImplementedError

    def _offset(self) -> float:
        """Seconds into the recording at which the segment's first byte plays."""
        return 0.0

    async def _with_captions(self, recording: Recording) -> Recording:
        """The recording with its WebVTT stored beside it: a partial recording's cues up to
        where it stops, a complete one's all."""
        job, segment = self.play.job, self.segment
        if job.transcript is None or segment is None:
            return recording
        start_at = segment.start_at - self._offset()
        until = recording.duration if recording.partial else None
        text = webvtt_for(job.transcript, segment.duration, start_at, until)
        if text is None:
            return recording
        try:
            url = await asyncio.to_thread(
                store_captions, text, self.destination, captions_name(self.name),
                settings=self.settings,
            )  # fmt: skip
        except StoreError as e:
            error = "; ".join(filter(None, [recording.error, f"no captions file: {e}"]))
            return recording.model_copy(update={"error": error})
        return recording.model_copy(update={"captions_url": url})

    def _failed(self, error: str) -> Recording:
        return _failed(error, self.backend)


class LocalRecording(RecordingHook):
    """Starts the recorder once the avatar listens and waits for it (so it hears the first
    byte), marks the segment's start and end, and returns what the recorder stored."""

    backend = "local"

    def __init__(self, play: PlayContext, settings: Settings, destination: str) -> None:
        super().__init__(play, settings, destination)
        self.proc: asyncio.subprocess.Process | None = None
        self.ready = False
        self.started = False

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
            "name": self.name,
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
        super().on_stream_start(segment)
        if self.proc is not None and self.ready:
            self.started = True
            self._send({"start": time.time()})

    def on_stream_end(self, segment: Segment) -> None:
        super().on_stream_end(segment)
        if not self.started:
            return
        end = self.play.timestamps.playback_finished or time.time()
        self._send({"end": end, "partial": self.partial})

    async def _stored(self) -> Recording | None:
        if self.proc is None:
            return None if self.error is None else self._failed(self.error)
        if not self.started:
            await self._stop()  # nothing was played: nothing to keep
            return None
        try:
            async with asyncio.timeout(STORED_TIMEOUT_S):
                answer = await self._answer()
            recording = Recording.model_validate(answer["recording"])
        except (TimeoutError, KeyError, ValueError) as e:
            recording = self._failed(f"the recorder did not store the recording: {e!r}")
        await self._stop()
        return recording

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


class EgressRecordingHook(RecordingHook):
    """Starts a participant egress of the avatar once it listens (Egress answers once it
    records, so the first byte is in the file), stops it once the avatar played the segment
    (or the job stopped), and returns the file Egress stored."""

    backend = "egress"

    def __init__(
        self, play: PlayContext, settings: Settings, destination: str, egress: EgressRecorder
    ) -> None:
        super().__init__(play, settings, destination)
        self.egress = egress
        self.egress_id: str | None = None
        self.started = False
        self._stopping: asyncio.Task[EgressRecording] | None = None
        #: When the first byte went out, and when Egress's file began (epoch seconds).
        self._first_byte_at = 0.0
        self._file_started_at: float | None = None

    async def on_link_ready(self) -> None:
        job = self.play.job
        path = egress_filepath(self.destination, self.name)
        try:
            self.egress_id = await self.egress.start(job.room, job.avatar_identity, path)
        except (EgressError, ValueError) as e:
            self.error = f"Egress did not record: {e}"
            log.warning("job %s: %s", job.job_id, self.error)

    def on_stream_start(self, segment: Segment) -> None:
        super().on_stream_start(segment)
        self.started = self.egress_id is not None
        self._first_byte_at = time.time()

    def on_stream_end(self, segment: Segment) -> None:
        super().on_stream_end(segment)
        # Asked now, before the session is given back: an avatar that leaves first would end
        # the egress on its own, and Egress would call the file partial.
        if self.egress_id is not None:
            self._stopping = asyncio.create_task(self.egress.stop(self.egress_id))

    async def _stored(self) -> Recording | None:
        if self.egress_id is None:
            return None if self.error is None else self._failed(self.error)
        try:
            made = await (self._stopping or self.egress.stop(self.egress_id))
        except EgressError as e:
            return self._failed(str(e))
        if not self.started:
            return None  # nothing was played: nothing to keep
        self._file_started_at = made.started_at
        return Recording(
            url=made.url,
            duration=round(made.duration_s, 3),
            size=made.size_bytes,
            partial=made.partial or self.partial,
            backend=self.backend,
            error=made.error,
        )

    def _offset(self) -> float:
        # Egress's file begins when it first had the avatar's media, before the first byte.
        began = self._file_started_at
        return 0.0 if began is None else max(0.0, self._first_byte_at - began)


def _failed(error: str, backend: str = "local") -> Recording:
    return Recording(url=None, duration=0.0, size=0, partial=True, backend=backend, error=error)


def recording_hooks(settings: Settings) -> HookFactory:
    """The hook that records a job that asks for it (and does nothing for the others), with
    the backend `AVATARQ_RECORDING_BACKEND` names."""
    egress = (
        EgressRecorder.from_settings(settings) if settings.recording_backend == "egress" else None
    )

    def make(play: PlayContext) -> JobHook:
        try:
            destination = destination_of(play.job, settings)
        except ValueError as e:
            return _Unrecordable(play, str(e), settings.recording_backend)
        if destination is None:
            return JobHook()
        if egress is not None:
            return EgressRecordingHook(play, settings, destination, egress)
        return LocalRecording(play, settings, destination)

    return make


class _Unrecordable(JobHook):
    """A job that asked for a recording the worker cannot make: it plays, and its result
    says why there is no recording."""

    def __init__(self, play: PlayContext, error: str, backend: str) -> None:
        self.play, self.error, self.backend = play, error, backend

    async def on_released(self) -> None:
        self.play.recording = _failed(self.error, self.backend)
