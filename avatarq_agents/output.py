"""An `AgentSession` audio output that speaks through avatarq's sender (tasks/link/stream.py).

Each segment the session captures becomes one paced `lk.audio_stream`; the avatar's
`lk.playback_finished` for it is reported to the session as DataStreamAudioOutput does. Its
RPC handlers belong to this room's participant, so rooms never share reports."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from livekit import rtc
from livekit.agents.voice.io import AudioOutput, AudioOutputCapabilities

from avatarq_agents.pcm import ToAvatarPcm
from tasks.link.pacing import Pacer
from tasks.link.stream import CHUNK_SECONDS, AudioStreamSender
from tasks.link.types import PlaybackFinished

log = logging.getLogger("avatarq.agents")


@dataclass
class _Segment:
    """One captured segment: its PCM, queued until the sender takes it (None ends it)."""

    pcm: ToAvatarPcm
    queue: asyncio.Queue[bytes | None] = field(default_factory=asyncio.Queue)
    #: Set by clear_buffer: the rest is never sent and the avatar's buffer is cleared.
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    #: All of it went out and the stream is closed: a clear must reach the avatar by RPC.
    sent: bool = False

    def end(self) -> None:
        rest = self.pcm.flush()
        if rest and not self.stop.is_set():
            self.queue.put_nowait(rest)
        self.queue.put_nowait(None)

    def cancel(self) -> None:
        self.stop.set()
        self.queue.put_nowait(None)  # wakes a sender waiting for audio

    async def chunks(self, chunk_bytes: int) -> AsyncIterator[bytes]:
        """What is queued, in writes of up to `chunk_bytes` (each write is an FFI round trip;
        the session captures 10-20 ms frames)."""
        while not self.stop.is_set():
            piece = await self.queue.get()
            if piece is None or self.stop.is_set():
                return
            parts, size, ended = [piece], len(piece), False
            while size < chunk_bytes and not self.queue.empty():
                more = self.queue.get_nowait()
                if more is None:
                    ended = True
                    break
                parts.append(more)
                size += len(more)
            yield b"".join(parts)
            if ended:
                return


class AvatarAudioOutput(AudioOutput):
    """Plays the session's speech on the avatar, one segment at a time, in order."""

    def __init__(self, sender: AudioStreamSender, *, lead: float, report_timeout: float) -> None:
        super().__init__(
            label="avatarq",
            capabilities=AudioOutputCapabilities(pause=False),
            sample_rate=sender.sample_rate,
        )
        self.sender = sender
        self.lead = lead
        #: Extra wait for `lk.playback_finished` after the audio the avatar holds.
        self.report_timeout = report_timeout
        self._capturing: _Segment | None = None
        #: Captured and not yet reported, oldest first: the pump plays them in turn.
        self._pending: deque[_Segment] = deque()
        self._pump: asyncio.Task[None] | None = None
        self._clears: set[asyncio.Task[None]] = set()
        #: Held while a segment plays, from its first write to its report: a batch job played
        #: into the room (avatarq_agents/turns.py) takes it too, so one voice at a time.
        self.floor = asyncio.Lock()

    async def capture_frame(self, frame: rtc.AudioFrame) -> None:
        await super().capture_frame(frame)
        segment = self._capturing
        if segment is None:
            segment = self._capturing = _Segment(ToAvatarPcm(self.sender.sample_rate))
            self._pending.append(segment)
            if self._pump is None or self._pump.done():
                self._pump = asyncio.create_task(self._play_pending())
        if not segment.stop.is_set():
            pcm = segment.pcm.push(frame)
            if pcm:
                segment.queue.put_nowait(pcm)

    def flush(self) -> None:
        super().flush()
        segment, self._capturing = self._capturing, None
        if segment is not None:
            segment.end()

    def clear_buffer(self) -> None:
        """Stop every segment not yet reported; the one playing is cleared on the avatar."""
        for segment in self._pending:
            if segment.sent and not segment.stop.is_set():
                # Its stream is closed, the avatar still plays what it holds (up to the lead).
                task = asyncio.create_task(self._clear_avatar())
                self._clears.add(task)
                task.add_done_callback(self._clears.discard)
            segment.cancel()

    async def _clear_avatar(self) -> None:
        try:
            await self.sender.clear_buffer()
        except Exception as e:  # its report, or the fallback, still ends the segment
            log.warning("lk.clear_buffer to %s failed: %s", self.sender.avatar_identity, e)

    async def _play_pending(self) -> None:
        while self._pending:
            segment = self._pending[0]
            try:
                async with self.floor:
                    finished = await self._play(segment)
            except Exception as e:  # the room or avatar is gone: the session must not hang
                log.warning("segment not played on avatar %s: %s", self.sender.avatar_identity, e)
                finished = PlaybackFinished(0.0, interrupted=True)
            self._pending.popleft()
            self.on_playback_finished(
                playback_position=finished.playback_position, interrupted=finished.interrupted
            )

    async def _play(self, segment: _Segment) -> PlaybackFinished:
        if segment.stop.is_set():
            return PlaybackFinished(0.0, interrupted=True)  # cleared before it was sent
        bps = self.sender.bytes_per_second
        pacer = Pacer(bytes_per_second=bps, lead=self.lead)

        announced = False

        async def started(sent: int) -> None:
            # The first write: the avatar starts playing now (it may not send lk.playback_started).
            nonlocal announced
            if not announced:
                announced = True
                self.on_playback_started(created_at=time.time())

        sent = await self.sender.send_segment(
            segment.chunks(int(bps * CHUNK_SECONDS)),
            pacer,
            on_progress=started,
            stop=segment.stop,
            name="avatarq-agent",
        )
        segment.sent = not segment.stop.is_set()
        sent_s = sent / bps
        if sent == 0:
            return PlaybackFinished(0.0, interrupted=segment.stop.is_set())
        # The avatar still holds what was sent ahead of the clock (at most the lead).
        assert pacer.t0 is not None
        held = max(0.0, pacer.t0 + sent_s - time.monotonic())
        finished = await self.sender.wait_playback_finished(held + self.report_timeout)
        if finished is None:
            log.warning(
                "no lk.playback_finished from %s: reporting %.2fs as played",
                self.sender.avatar_identity,
                sent_s,
            )
            return PlaybackFinished(sent_s, interrupted=segment.stop.is_set())
        return finished

    async def aclose(self) -> None:
        """Stop playing: what is pending is reported interrupted."""
        self.clear_buffer()
        if self._pump is not None:
            with contextlib.suppress(Exception):
                await self._pump
        await asyncio.gather(*self._clears, return_exceptions=True)
