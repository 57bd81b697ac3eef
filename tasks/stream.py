"""Send PCM to the avatar with the wire protocol of livekit-agents' DataStreamAudioOutput.

One byte stream per segment on topic `lk.audio_stream`, attributes `sample_rate` and
`num_channels`, closed at the end of the segment; the avatar answers with the
`lk.playback_finished` RPC. We speak it on plain `livekit.rtc` instead of reusing
DataStreamAudioOutput, whose RPC handlers live in class-level dicts keyed by the avatar's
identity: two rooms with the same avatar in one process would cross.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from livekit import rtc

from tasks.pacing import Pacer

AUDIO_STREAM_TOPIC = "lk.audio_stream"
RPC_PLAYBACK_FINISHED = "lk.playback_finished"
RPC_PLAYBACK_STARTED = "lk.playback_started"
RPC_CLEAR_BUFFER = "lk.clear_buffer"
BYTES_PER_SAMPLE = 2  # s16le
NUM_CHANNELS = 1


@dataclass(frozen=True)
class PlaybackFinished:
    playback_position: float
    interrupted: bool


ProgressCallback = Callable[[int], Awaitable[None]]


class AudioStreamSender:
    """Streams segments to one avatar participant in one room and hears back from it."""

    def __init__(self, room: rtc.Room, avatar_identity: str, sample_rate: int) -> None:
        self.room = room
        self.avatar_identity = avatar_identity
        self.sample_rate = sample_rate
        self.bytes_per_second = sample_rate * NUM_CHANNELS * BYTES_PER_SAMPLE
        self._finished: asyncio.Queue[PlaybackFinished] = asyncio.Queue()
        self.playback_started = asyncio.Event()
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
        self._finished.put_nowait(event)
        return "ok"

    def _on_playback_started(self, data: rtc.RpcInvocationData) -> str:
        if self._from_avatar(data):
            self.playback_started.set()
        return "ok"

    async def send_segment(
        self,
        chunks: AsyncIterator[bytes],
        pacer: Pacer,
        *,
        on_progress: ProgressCallback | None = None,
        stop: asyncio.Event | None = None,
        name: str = "avatarq",
    ) -> int:
        """Stream one segment, paced by `pacer`; returns the bytes sent. Closes the stream.

        Returns early, within one chunk's pacing wait, once `stop` is set."""
        writer = await self.room.local_participant.stream_bytes(
            name=name,
            topic=AUDIO_STREAM_TOPIC,
            destination_identities=[self.avatar_identity],
            attributes={"sample_rate": str(self.sample_rate), "num_channels": str(NUM_CHANNELS)},
        )
        sent = 0
        try:
            async for chunk in chunks:
                if pacer.t0 is None:
                    pacer.start()
                await pacer.wait(sent)
                if stop is not None and stop.is_set():
                    break
                await writer.write(chunk)
                sent += len(chunk)
                if on_progress is not None:
                    await on_progress(sent)
        finally:
            # Closing ends the segment: the avatar plays what it has and reports back.
            await writer.aclose()
        return sent

    async def wait_playback_finished(self, timeout: float) -> PlaybackFinished | None:
        """The avatar's report, or None if it never came (a lost RPC must not hang the job)."""
        try:
            return await asyncio.wait_for(self._finished.get(), timeout)
        except TimeoutError:
            return None

    async def clear_buffer(self, timeout: float = 2.0) -> None:
        """Ask the avatar to drop what it has buffered (interrupt)."""
        await self.room.local_participant.perform_rpc(
            destination_identity=self.avatar_identity,
            method=RPC_CLEAR_BUFFER,
            payload="",
            response_timeout=timeout,
        )
