"""The local recorder: one process per recorded job (encoding never runs in the worker's send
loop). It joins the job's room hidden, subscribes to the avatar's video and audio, keeps what
arrives between the job's start and end marks, and muxes it to an MP4 with ffmpeg. The worker
speaks to it in JSON lines on stdin and stdout (tasks/recording.py; docs/recordings.md)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sys
import tempfile
import time
from collections import deque
from pathlib import Path
from typing import Any, BinaryIO

from livekit import rtc
from pydantic import BaseModel, ConfigDict, SecretStr

from avatarq.results import Recording
from avatarq.settings import Settings, get_settings
from tasks.recording_store import StoreError, store

log = logging.getLogger("avatarq.recorder")

AUDIO_RATE = 48000
#: How much later the avatar's media reaches this subscriber than the worker's marks (the
#: avatar's playout, the SFU, the jitter buffer): the marks are moved by it. At most the real
#: delay, so a warm room's next job stays out (measured: docs/recordings.md).
RECEIVE_DELAY_S = 0.1
#: A pause in the avatar's audio longer than this is kept as silence, not closed up.
AUDIO_GAP_S = 0.06
#: Frames kept from before the start mark arrives (it comes a moment after the time it marks).
PREROLL_FRAMES = 400
CONNECT_TIMEOUT_S = 20.0
#: How long `ready` waits for an avatar already in the room to send its first frames.
FIRST_FRAMES_TIMEOUT_S = 5.0
#: The longest a recording may run without its end mark (the worker went away).
MAX_RECORDING_S = 4 * 3600.0
MUX_TIMEOUT_S = 300.0
RECORDER_NICE = 19


class Order(BaseModel):
    """What to record: the first line on stdin (the token travels there, never in argv)."""

    model_config = ConfigDict(extra="forbid")

    livekit_url: str
    token: SecretStr
    avatar_identity: str
    destination: str
    name: str
    title: str
    fps: int
    #: The worker's ffmpeg (`AVATARQ_FFMPEG`, else imageio-ffmpeg's, tasks/decode.py).
    ffmpeg: str


class AudioTimeline:
    """The avatar's audio from the start mark, placed by arrival time: contiguous while it
    flows, silence where it paused."""

    def __init__(self, out: BinaryIO) -> None:
        self.out = out
        self.start: float | None = None
        self.written = 0  # samples
        self.pending: deque[tuple[float, bytes, int]] = deque(maxlen=PREROLL_FRAMES)

    def add(self, arrived: float, pcm: bytes, samples: int) -> None:
        if self.start is None:
            self.pending.append((arrived, pcm, samples))
        else:
            self._write(arrived, pcm, samples)

    def begin(self, start: float) -> None:
        self.start = start
        while self.pending:
            self._write(*self.pending.popleft())

    def _write(self, arrived: float, pcm: bytes, samples: int) -> None:
        assert self.start is not None
        # A frame arrives once its last sample was played: it began `samples` earlier.
        at = round((arrived - self.start) * AUDIO_RATE) - samples
        if at < -samples // 2:
            return  # played before the job's start
        gap = at - self.written
        if gap > AUDIO_GAP_S * AUDIO_RATE:
            self.out.write(bytes(2 * gap))
            self.written += gap
        self.out.write(pcm)
        self.written += samples

    def finish(self, samples: int) -> None:
        """Cut or pad to exactly `samples`."""
        if self.written < samples:
            self.out.write(bytes(2 * (samples - self.written)))
        self.out.flush()
        self.out.truncate(2 * samples)


class VideoTimeline:
    """The avatar's video at a constant frame rate from the start mark, encoded as it comes
    (ffmpeg, H.264): each slot shows the latest frame that arrived by then."""

    def __init__(self, ffmpeg: str, path: Path, fps: int) -> None:
        self.ffmpeg, self.path, self.fps = ffmpeg, path, fps
        self.start: float | None = None
        self.latest: bytes | None = None
        self.size: tuple[int, int] | None = None
        self.slots = 0
        self.encoder: asyncio.subprocess.Process | None = None

    async def add(self, arrived: float, frame: rtc.VideoFrame) -> None:
        size = (frame.width, frame.height)
        if self.size is None:
            self.size = size
        elif size != self.size:
            return  # the encoder's size is fixed: a resized frame is skipped (held)
        if self.start is not None:
            await self._emit_until(arrived)
        self.latest = bytes(frame.data)

    def begin(self, start: float) -> None:
        self.start = start

    async def _emit_until(self, until: float) -> None:
        assert self.start is not None
        if self.latest is None or self.size is None:
            return
        if self.encoder is None:
            self.encoder = await self._start_encoder(*self.size)
        assert self.encoder.stdin is not None
        while (
            self.slots < self.fps * MAX_RECORDING_S and self.start + self.slots / self.fps < until
        ):
            self.encoder.stdin.write(self.latest)
            self.slots += 1
        await self.encoder.stdin.drain()

    async def _start_encoder(self, width: int, height: int) -> asyncio.subprocess.Process:
        argv = [self.ffmpeg, "-nostdin", "-loglevel", "error", "-y"]
        argv += ["-f", "rawvideo", "-pix_fmt", "yuv420p", "-s", f"{width}x{height}"]
        argv += ["-r", str(self.fps), "-i", "pipe:0", "-c:v", "libx264", "-preset", "veryfast"]
        argv += ["-pix_fmt", "yuv420p", "-f", "matroska", str(self.path)]
        return await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.PIPE)

    async def finish(self, end: float) -> bool:
        """Fill the slots up to `end`; True when there is any video."""
        await self._emit_until(end)
        if self.encoder is None:
            return False
        assert self.encoder.stdin is not None
        self.encoder.stdin.close()
        async with asyncio.timeout(MUX_TIMEOUT_S):
            return await self.encoder.wait() == 0


class Recorder:
    """One job's recording, from `ready` to the stored file."""

    def __init__(self, order: Order, settings: Settings, workdir: Path) -> None:
        self.order, self.settings, self.workdir = order, settings, workdir
        self.ffmpeg = order.ffmpeg
        self.audio_file = open(workdir / "audio.s16", "w+b")  # noqa: SIM115 (closed in finish)
        self.audio = AudioTimeline(self.audio_file)
        self.video = VideoTimeline(self.ffmpeg, workdir / "video.mkv", order.fps)
        self.room = rtc.Room()
        self.tasks: set[asyncio.Task[None]] = set()
        self.first_frames = asyncio.Event()
        self.audio_subscribed = False

    async def join(self) -> None:
        options = rtc.RoomOptions(auto_subscribe=False)
        self.room.on("track_published", self._on_published)
        self.room.on("track_subscribed", self._on_subscribed)
        token = self.order.token.get_secret_value()
        async with asyncio.timeout(CONNECT_TIMEOUT_S):
            await self.room.connect(self.order.livekit_url, token, options)
        avatar = self.room.remote_participants.get(self.order.avatar_identity)
        if avatar is None:
            return  # a cold start: its tracks are subscribed as it publishes them
        for publication in avatar.track_publications.values():
            self._on_published(publication, avatar)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(FIRST_FRAMES_TIMEOUT_S):
                await self.first_frames.wait()

    def _on_published(
        self, publication: rtc.RemoteTrackPublication, participant: rtc.RemoteParticipant
    ) -> None:
        if participant.identity == self.order.avatar_identity:
            publication.set_subscribed(True)

    def _on_subscribed(
        self,
        track: rtc.Track,
        _publication: rtc.RemoteTrackPublication,
        participant: rtc.RemoteParticipant,
    ) -> None:
        if participant.identity != self.order.avatar_identity:
            return
        if track.kind == rtc.TrackKind.KIND_AUDIO:
            self.audio_subscribed = True
            self._spawn(self._read_audio(track))
        elif track.kind == rtc.TrackKind.KIND_VIDEO:
            self._spawn(self._read_video(track))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _read_audio(self, track: rtc.Track) -> None:
        stream = rtc.AudioStream(track, sample_rate=AUDIO_RATE, num_channels=1)
        try:
            async for event in stream:
                frame = event.frame
                self.audio.add(time.time(), bytes(frame.data), frame.samples_per_channel)
        finally:
            await stream.aclose()

    async def _read_video(self, track: rtc.Track) -> None:
        stream = rtc.VideoStream(track, format=rtc.VideoBufferType.I420)
        try:
            async for event in stream:
                await self.video.add(time.time(), event.frame)
                # An idle avatar's video flows, its audio may not: video and an audio
                # subscription say the recorder hears what comes next.
                if self.audio_subscribed:
                    self.first_frames.set()
        finally:
            await stream.aclose()

    def begin(self, start: float) -> None:
        self.audio.begin(start)
        self.video.begin(start)

    async def finish(self, end: float, *, partial: bool) -> Recording:
        """Stop at `end`, mux, store; the recording's length is the end less the start."""
        start = self.audio.start if self.audio.start is not None else end
        duration = max(0.0, end - start)
        await self._leave()
        samples = round(duration * AUDIO_RATE)
        self.audio.finish(samples)
        self.audio_file.close()
        has_video = await self.video.finish(end)
        out = self.workdir / "recording.mp4"
        await self._mux(out, duration, has_video=has_video, partial=partial)
        size = out.stat().st_size
        url = await asyncio.to_thread(
            store, out, self.order.destination, self.order.name, partial=partial,
            settings=self.settings,
        )  # fmt: skip
        return Recording(
            url=url,
            duration=round(samples / AUDIO_RATE, 3),
            size=size,
            partial=partial,
            backend="local",
            error=None if has_video else "no video frames arrived from the avatar",
        )

    async def _leave(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.room.disconnect()

    async def _mux(self, out: Path, duration: float, *, has_video: bool, partial: bool) -> None:
        argv = [self.ffmpeg, "-nostdin", "-loglevel", "error", "-y"]
        if has_video:
            argv += ["-i", str(self.video.path)]
        argv += ["-f", "s16le", "-ar", str(AUDIO_RATE), "-ac", "1", "-i", str(self.audio_file.name)]
        argv += ["-map", "0:v", "-map", "1:a", "-c:v", "copy"] if has_video else ["-map", "0:a"]
        argv += ["-c:a", "aac", "-b:a", "96k", "-t", f"{duration:.3f}"]
        argv += ["-metadata", f"title={self.order.title}"]
        argv += ["-metadata", f"comment={'partial' if partial else 'complete'}"]
        argv += ["-movflags", "+faststart", str(out)]
        proc = await asyncio.create_subprocess_exec(*argv, stderr=asyncio.subprocess.PIPE)
        async with asyncio.timeout(MUX_TIMEOUT_S):
            _, err = await proc.communicate()
        if proc.returncode != 0:
            raise StoreError(f"ffmpeg could not mux the recording: {err.decode()[-500:]}")


async def _lines() -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    loop = asyncio.get_running_loop()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    return reader


def _say(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


async def run() -> None:
    """Read the order, join, say `ready`, follow the marks, say the `recording`."""
    reader = await _lines()
    order = Order.model_validate_json(await reader.readline())
    with tempfile.TemporaryDirectory(prefix="avatarq-rec-") as tmp:
        recorder = Recorder(order, get_settings(), Path(tmp))
        try:
            await recorder.join()
        except (TimeoutError, rtc.ConnectError) as e:
            # The server's answer may echo the token: never let it into the worker's log.
            text = (str(e) or type(e).__name__).replace(order.token.get_secret_value(), "***")
            log.error("could not join the room: %s", text)
            return
        _say({"ready": True})
        started = False
        async with asyncio.timeout(MAX_RECORDING_S):
            while line := await reader.readline():
                mark = json.loads(line)
                if "start" in mark:
                    recorder.begin(float(mark["start"]) + RECEIVE_DELAY_S)
                    started = True
                elif "end" in mark and started:
                    partial = bool(mark.get("partial"))
                    end = float(mark["end"]) + RECEIVE_DELAY_S
                    await asyncio.sleep(max(0.0, end - time.time()))
                    try:
                        recording = await recorder.finish(end, partial=partial)
                    except StoreError as e:
                        recording = Recording(
                            url=None, duration=0.0, size=0, partial=True, backend="local",
                            error=str(e),
                        )  # fmt: skip
                    _say({"recording": recording.model_dump(mode="json")})
                    return
                else:
                    break  # aborted before the first byte: nothing to keep
        # The worker went away mid-recording: keep what was rendered, marked partial.
        if started:
            await recorder.finish(time.time(), partial=True)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="recorder %(levelname)s %(message)s")
    # Behind the worker's send loops for the CPU (its ffmpeg encoder inherits it): a
    # recording may lag and catch up, a stream may not.
    os.nice(RECORDER_NICE)
    asyncio.run(run())


if __name__ == "__main__":
    main()
