"""Send PCM to the avatar with the wire protocol of livekit-agents' DataStreamAudioOutput.

One `lk.audio_stream` byte stream per segment, answered by `lk.playback_finished`, spoken on
plain `livekit.rtc` because agents' class-level RPC handlers would cross two rooms with the
same avatar. A report counts only once its segment has ended (it carries no segment id)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator

from livekit import rtc

from tasks.link.pacing import Pacer, tail_pieces
from tasks.link.transcription import TranscriptionOut
from tasks.link.types import Admit, PlaybackFinished, ProgressCallback

log = logging.getLogger("avatarq.stream")

AUDIO_STREAM_TOPIC = "lk.audio_stream"
RPC_PLAYBACK_FINISHED = "lk.playback_finished"
RPC_PLAYBACK_STARTED = "lk.playback_started"
RPC_CLEAR_BUFFER = "lk.clear_buffer"
#: The Avaluma plugin's turn-taking RPC and the states it sends (livekit-agents AgentState).
RPC_AGENT_STATE_CHANGED = "agent_state_changed"
STATE_SPEAKING = "speaking"
STATE_LISTENING = "listening"
CLEAR_BUFFER_TIMEOUT_S = 2.0
#: Audio per write. Each write is an FFI round trip whose completion the SDK hands to every
#: room of the process, so fewer, larger writes cost less and keep the schedule (measured in
#: docs/performance.md). The avatar never holds less than the lead, and the last chunk is cut
#: into small pieces (tasks/link/pacing.py TAIL_SECONDS), so the end overhead does not grow with
#: it; a stop waits at most one chunk.
CHUNK_SECONDS = 0.4
BYTES_PER_SAMPLE = 2  # s16le
NUM_CHANNELS = 1


class AudioStreamSender:
    """Streams segments to one avatar participant in one room and hears back from it."""

    def __init__(self, room: rtc.Room, avatar_identity: str, sample_rate: int) -> None:
        self.room = room
        self.avatar_identity = avatar_identity
        self.sample_rate = sample_rate
        self.bytes_per_second = sample_rate * NUM_CHANNELS * BYTES_PER_SAMPLE
        self._finished: asyncio.Queue[PlaybackFinished] = asyncio.Queue()
        #: True from the end of a segment until its report came: only then is one taken.
        self._awaiting_report = False
        self.stray_reports = 0
        self.playback_started = asyncio.Event()
        self.captions = TranscriptionOut(room, avatar_identity)
        self._state_tasks: set[asyncio.Task[None]] = set()
        lp = room.local_participant
        lp.register_rpc_method(RPC_PLAYBACK_FINISHED, self._on_playback_finished)
        lp.register_rpc_method(RPC_PLAYBACK_STARTED, self._on_playback_started)

    def _from_avatar(self, data: rtc.RpcInvocationData) -> bool:
        return data.caller_identity == self.avatar_identity

    def _on_playback_finished(self, data: rtc.RpcInvocationData) -> str:
        if not self._from_avatar(data):
            return "reject"
        try:
            body = json.loads(data.payload)
            event = PlaybackFinished(float(body["playback_position"]), bool(body["interrupted"]))
        except (ValueError, KeyError, TypeError):
            raise rtc.RpcError(rtc.RpcError.ErrorCode.APPLICATION_ERROR, "bad payload") from None
        if not self._awaiting_report:
            self.stray_reports += 1
            log.info("ignored a lk.playback_finished that answers no ended segment: %s", event)
            return "ok"
        self._awaiting_report = False
        self._finished.put_nowait(event)
        return "ok"

    def _on_playback_started(self, data: rtc.RpcInvocationData) -> str:
        if self._from_avatar(data):
            self.playback_started.set()
            if self.captions.playback_started_at is None:
                self.captions.playback_started_at = time.monotonic()
        return "ok"

    async def send_segment(
        self,
        chunks: AsyncIterator[bytes],
        pacer: Pacer,
        *,
        on_progress: ProgressCallback | None = None,
        stop: asyncio.Event | None = None,
        admit: Admit | None = None,
        name: str = "avatarq",
    ) -> int:
        """Stream one segment, paced by `pacer`; returns the bytes sent. Closes the stream.

        Returns early, within one chunk's pacing wait, once `stop` is set; the avatar's buffer
        is then cleared before the stream closes, as DataStreamAudioOutput does. `admit` may
        hold a piece back (the schedule moves on if the avatar ran dry meanwhile)."""
        self._awaiting_report = False
        self.captions.playback_started_at = None
        while not self._finished.empty():
            self._finished.get_nowait()  # a late report of an earlier segment
        writer = await self.room.local_participant.stream_bytes(
            name=name,
            topic=AUDIO_STREAM_TOPIC,
            destination_identities=[self.avatar_identity],
            attributes={"sample_rate": str(self.sample_rate), "num_channels": str(NUM_CHANNELS)},
        )
        self.set_agent_state(STATE_SPEAKING)
        sent = 0
        frame = BYTES_PER_SAMPLE * NUM_CHANNELS
        # One waiter for the whole segment: every pacing wait ends early once it is done.
        stopped = asyncio.ensure_future(stop.wait()) if stop is not None else None
        try:
            # One chunk ahead, to know which is the last: that one goes out in short pieces.
            upcoming = await anext(chunks, None)
            while upcoming is not None:
                chunk, upcoming = upcoming, await anext(chunks, None)
                last = upcoming is None
                pieces = tail_pieces(chunk, self.bytes_per_second, frame) if last else [chunk]
                for piece in pieces:
                    if pacer.t0 is None:
                        pacer.start()
                    if admit is not None:
                        await admit(sent + len(piece))
                        pacer.resync(sent)
                    await pacer.wait(sent, stopped)
                    if stop is not None and stop.is_set():
                        break
                    await writer.write(piece)
                    sent += len(piece)
                    if on_progress is not None:
                        await on_progress(sent)
                if stop is not None and stop.is_set():
                    break
        finally:
            if stopped is not None:
                stopped.cancel()
            self._awaiting_report = True
            if stop is not None and stop.is_set():
                await self._clear_quietly()
            # Closing ends the segment: the avatar plays what it has and reports back.
            await writer.aclose()
            self.set_agent_state(STATE_LISTENING)
        return sent

    async def _clear_quietly(self) -> None:
        if self.room.isconnected() and self.avatar_identity in self.room.remote_participants:
            try:
                await self.clear_buffer(CLEAR_BUFFER_TIMEOUT_S)
            except Exception as e:  # the avatar may be going; we are stopping anyway
                log.warning("lk.clear_buffer failed: %s", e)

    def set_agent_state(self, state: str) -> None:
        """Tell the avatar (fire and forget) whether we are speaking or listening."""
        task = asyncio.get_running_loop().create_task(self._send_state(state))
        self._state_tasks.add(task)
        task.add_done_callback(self._state_tasks.discard)

    async def _send_state(self, state: str) -> None:
        with contextlib.suppress(Exception):  # optional for avatar servers: many lack it
            await self.room.local_participant.perform_rpc(
                destination_identity=self.avatar_identity,
                method=RPC_AGENT_STATE_CHANGED,
                payload=state,
                response_timeout=CLEAR_BUFFER_TIMEOUT_S,
            )

    async def aclose(self) -> None:
        """Wait for state messages in flight (bounded by their RPC timeout)."""
        if self._state_tasks:
            await asyncio.gather(*self._state_tasks, return_exceptions=True)

    async def wait_playback_finished(self, timeout: float) -> PlaybackFinished | None:
        """The avatar's report, or None if it never came (a lost RPC must not hang the job)."""
        try:
            async with asyncio.timeout(timeout):
                return await self._finished.get()
        except TimeoutError:
            return None

    async def clear_buffer(self, timeout: float = CLEAR_BUFFER_TIMEOUT_S) -> None:
        """Ask the avatar to drop what it has buffered (interrupt)."""
        await self.room.local_participant.perform_rpc(
            destination_identity=self.avatar_identity,
            method=RPC_CLEAR_BUFFER,
            payload="",
            response_timeout=timeout,
        )
