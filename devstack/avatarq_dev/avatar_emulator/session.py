"""One emulated avatar in one LiveKit room.

Seen from the worker it behaves like a livekit-agents avatar (`AvatarRunner`, with agents' own
`DataStreamAudioReceiver`; what it does in order: docs/development.md, the local stack).
`Faults` (behaviour.py) switches on the known variations of real servers; everything it
receives is recorded."""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np
from livekit import rtc
from livekit.agents.types import ATTRIBUTE_PUBLISH_ON_BEHALF
from livekit.agents.voice.avatar import AudioSegmentEnd, DataStreamAudioReceiver
from livekit.agents.voice.avatar._datastream_io import RPC_CLEAR_BUFFER  # not re-exported

from tasks.toolkit import route_own_events

from .behaviour import Faults
from .playout import SegmentPlayout
from .recorder import SegmentRecord, SessionRecorder
from .video import FPS, HEIGHT, WIDTH, MouthVideo, audio_level

logger = logging.getLogger(__name__)

# The avaluma plugin reports the agent's turn-taking state to the avatar with this RPC;
# answering it keeps plugin-based senders from logging RPC errors.
RPC_AGENT_STATE_CHANGED = "agent_state_changed"
VIDEO_TRACK_NAME = "avatar_video"
AUDIO_TRACK_NAME = "avatar_audio"
#: The avatar's published audio (AvatarRunner's AudioSource): what it plays, at this rate.
AUDIO_TRACK_RATE = 16000
# The worker leaving is the normal end of a session; a short grace period rides out a
# participant list that is briefly empty while someone reconnects.
EMPTY_ROOM_GRACE_S = 1.0
_ROOM_POLL_S = 0.25


class TokenError(ValueError):
    """The LiveKit token is not a JWT with the claims the avatar needs."""


@dataclass(frozen=True)
class TokenInfo:
    """What the avatar reads from its LiveKit token (the LiveKit server verifies it)."""

    identity: str
    room: str | None
    sender_identity: str | None  # `lk.publish_on_behalf`: the participant sending audio

    @classmethod
    def parse(cls, token: str) -> TokenInfo:
        parts = token.split(".")
        if len(parts) != 3:
            raise TokenError("livekit_token is not a JWT")
        try:
            payload = base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4))
            claims = json.loads(payload)
        except (binascii.Error, ValueError) as e:
            raise TokenError("livekit_token payload is not base64url JSON") from e
        if not isinstance(claims, dict):
            raise TokenError("livekit_token payload is not a JSON object")
        identity = claims.get("sub")
        if not isinstance(identity, str) or not identity:
            raise TokenError("livekit_token has no identity (sub)")
        video = claims.get("video")
        room = video.get("room") if isinstance(video, dict) else None
        attributes = claims.get("attributes")
        if not isinstance(attributes, dict):
            attributes = {}
        sender = attributes.get(ATTRIBUTE_PUBLISH_ON_BEHALF)
        return cls(
            identity=identity,
            room=room if isinstance(room, str) else None,
            sender_identity=sender if isinstance(sender, str) and sender else None,
        )


class SessionState(StrEnum):
    STARTING = "starting"  # accepted, joining the room (or, with the fault join=false, never)
    JOINED = "joined"
    STOPPED = "stopped"
    FAILED = "failed"


@dataclass
class _Frame:
    segment: SegmentRecord
    frame: rtc.AudioFrame
    # Loop time of its arrival: an underrun is audio arriving after it was due, not this
    # process's own loop getting to a frame late while a hundred sessions share it.
    arrived: float


@dataclass
class _End:
    segment: SegmentRecord


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class AvatarSession:
    def __init__(
        self,
        session_id: str,
        *,
        livekit_url: str,
        token: str,
        token_info: TokenInfo,
        avatar_id: str,
        record_dir: Path | None,
        behaviour: Faults | None = None,
    ) -> None:
        self.session_id = session_id
        self.info = token_info
        self.avatar_id = avatar_id
        self.recorder = SessionRecorder(record_dir, session_id)
        self.state = SessionState.STARTING
        self.stop_reason: str | None = None
        self.error: str | None = None
        self.created_at = time.time()
        self.joined_at: float | None = None
        self.stopped_at: float | None = None
        self._livekit_url = livekit_url
        self._token = token
        self.behaviour = behaviour or Faults()
        #: Segments not played because of their sample rate (`Faults.sample_rates`).
        self.refused_rates: list[int] = []

        self._stop_requested = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._room: rtc.Room | None = None
        self._receiver: DataStreamAudioReceiver | None = None
        self._video_source: rtc.VideoSource | None = None
        self._audio_source: rtc.AudioSource | None = None
        self._refusing = False
        self._clear_buffer_handler: Any = None
        # The sender the receiver settled on (the token's, or the first agent to join).
        self._sender_identity: str | None = None

        # Receiving side: frames go from the receiver to the playout queue as they arrive.
        self._queue: asyncio.Queue[_Frame | _End] = asyncio.Queue()
        #: What it plays, to its published audio track (`_publish_loop`).
        self._outgoing: asyncio.Queue[rtc.AudioFrame] = asyncio.Queue()
        self._recv_segment: SegmentRecord | None = None
        # Playing side.
        self._playing: SegmentRecord | None = None
        self._playout: SegmentPlayout | None = None
        self._wake_fut: asyncio.Future[None] | None = None
        self._level = 0.0
        self._level_until = 0.0
        #: `agent_state_changed` payloads received (speaking / listening), in order.
        self.agent_states: list[str] = []
        self._video = MouthVideo()

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Join in the background: the HTTP answer must not wait for the room."""
        self._task = asyncio.create_task(self._run(), name=f"avatar-session-{self.session_id}")

    async def stop(self, reason: str) -> None:
        self._request_stop(reason)
        if self._task is not None:
            await asyncio.shield(self._task)

    @property
    def done(self) -> bool:
        return self.state in (SessionState.STOPPED, SessionState.FAILED)

    def _request_stop(self, reason: str) -> None:
        if not self._stop_requested.is_set():
            self.stop_reason = reason
            self._stop_requested.set()

    async def _run(self) -> None:
        try:
            if self.behaviour.join:
                await self._serve_until_stopped()
            else:
                await self._stop_requested.wait()
        except Exception as e:  # one broken session must not take the emulator down
            self._fail(e)
        finally:
            await self._cleanup()
            self.stopped_at = time.time()
            if self.state != SessionState.FAILED:
                self.state = SessionState.STOPPED
            self.recorder.close()
            self._save()
            logger.info(
                "session %s stopped (%s): %d segments, %.2fs audio received",
                self.session_id,
                self.stop_reason or self.error,
                len(self.recorder.segments),
                sum(s.received_s for s in self.recorder.segments),
            )

    async def _serve_until_stopped(self) -> None:
        # A stop may arrive while room.connect is still pending: race them.
        serve = asyncio.create_task(self._join_and_serve())
        stopped = asyncio.create_task(self._stop_requested.wait())
        try:
            await asyncio.wait({serve, stopped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
            serve.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await serve  # re-raises what made the session fail

    def _fail(self, error: BaseException) -> None:
        if self.state != SessionState.FAILED:
            self.state = SessionState.FAILED
            self.error = f"{type(error).__name__}: {error}"
            logger.warning("session %s failed: %s", self.session_id, self.error)
        self._request_stop("error")

    async def _join_and_serve(self) -> None:
        room = self._room = rtc.Room()
        await room.connect(self._livekit_url, self._token)
        route_own_events(room)  # see cli.main
        self.joined_at = time.time()
        self.state = SessionState.JOINED
        logger.info(
            "session %s joined room %s as %s", self.session_id, self.info.room, self.info.identity
        )
        room.local_participant.register_rpc_method(RPC_AGENT_STATE_CHANGED, self._on_state)
        room.on("connection_state_changed", self._on_connection_state)
        self._spawn(self._watch_room(room))
        behaviour = self.behaviour
        if behaviour.leave_after_s is not None:
            self._spawn(self._leave_after(behaviour.leave_after_s))

        # AvatarRunner starts its receiver first (it waits for the sender to be in the room),
        # then publishes. A server that registers it late is a variation.
        if not behaviour.receiver_delay_s:
            receiver = await self._start_receiver(room)
        await self._publish(room)
        if behaviour.receiver_delay_s:
            await asyncio.sleep(behaviour.receiver_delay_s)
            receiver = await self._start_receiver(room)
        self._spawn(self._receive_loop(receiver))
        self._spawn(self._playout_loop())
        if self._audio_source is not None:
            self._spawn(self._publish_loop(self._audio_source))
        await self._stop_requested.wait()

    async def _start_receiver(self, room: rtc.Room) -> DataStreamAudioReceiver:
        sender = self.info.sender_identity if self.behaviour.bind == "token" else None
        receiver = self._receiver = DataStreamAudioReceiver(room, sender_identity=sender)
        receiver.on("clear_buffer", self._on_clear_buffer)
        await receiver.start()  # waits for the sender to be in the room
        # Private attribute: the receiver does not otherwise tell whom it settled on.
        bound = receiver._remote_participant
        self._sender_identity = bound.identity if bound is not None else None
        self._route_clear_buffer_to_this_room()
        return receiver

    async def _publish(self, room: rtc.Room) -> None:
        """AvatarRunner's order: audio, then (once someone subscribed to it) video."""
        lp = room.local_participant
        if self.behaviour.publish == "runner":
            audio = self._audio_source = rtc.AudioSource(AUDIO_TRACK_RATE, 1)
            track = rtc.LocalAudioTrack.create_audio_track(AUDIO_TRACK_NAME, audio)
            publication = await lp.publish_track(
                track, rtc.TrackPublishOptions(source=rtc.TrackSource.SOURCE_MICROPHONE)
            )
            await publication.wait_for_subscription()
        source = self._video_source = rtc.VideoSource(WIDTH, HEIGHT)
        video = rtc.LocalVideoTrack.create_video_track(VIDEO_TRACK_NAME, source)
        await lp.publish_track(video, rtc.TrackPublishOptions(source=rtc.TrackSource.SOURCE_CAMERA))
        self._spawn(self._video_loop(source))

    def _on_state(self, data: rtc.RpcInvocationData) -> str:
        # The avaluma plugin's turn-taking state; answering keeps senders from logging errors.
        self.agent_states.append(data.payload)
        return "ok"

    def _on_connection_state(self, state: rtc.ConnectionState.ValueType) -> None:
        # What it plays while cut off from the server reaches no one (the SDK notices a dead
        # server at once, our room watch only on its next poll); saved at once, as the
        # livekit-rtc FFI can crash as the server goes away.
        seg, playout = self._playing, self._playout
        if state == rtc.ConnectionState.CONN_CONNECTED or seg is None or playout is None:
            return
        if seg.heard_until is None:
            seg.heard_until = playout.position(asyncio.get_running_loop().time())
            self._save()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._on_task_done)

    def _on_task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (error := task.exception()) is not None:
            self._fail(error)

    async def _cleanup(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._playing is not None and self._playout is not None:
            # Leaving mid-segment: record how far it got; the sender learns from our departure.
            position = self._playout.position(asyncio.get_running_loop().time())
            self._playing.finish(position=position, interrupted=True, at=time.time())
            self._playing = None
        if self._receiver is not None:
            await self._receiver.aclose()
            self._release_clear_buffer_handler()
        if self._video_source is not None:
            await self._video_source.aclose()
        if self._audio_source is not None:
            await self._audio_source.aclose()
        if self._room is not None:
            await self._room.disconnect()

    async def _leave_after(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
        self._request_stop("fault_leave_after")

    async def _watch_room(self, room: rtc.Room) -> None:
        loop = asyncio.get_running_loop()
        empty_since: float | None = None
        while True:
            await asyncio.sleep(_ROOM_POLL_S)
            if not room.isconnected():
                self._request_stop("disconnected")
                return
            if room.remote_participants and not self._sender_gone(room):
                empty_since = None
                continue
            now = loop.time()
            empty_since = empty_since if empty_since is not None else now
            if now - empty_since >= EMPTY_ROOM_GRACE_S:
                self._request_stop("room_empty")
                return

    def _sender_gone(self, room: rtc.Room) -> bool:
        """Avatar servers end a session once the agent they speak for has left."""
        sender = self._sender_identity or self.info.sender_identity
        return sender is not None and sender not in room.remote_participants

    # -- audio -------------------------------------------------------------------------------

    async def _receive_loop(self, receiver: DataStreamAudioReceiver) -> None:
        try:
            async for item in receiver:
                self._on_received(item)
        except Exception:
            # The receiver dies when its lk.playback_finished RPC fails after retries, which is
            # what happens when the worker leaves right after its last segment: a normal end,
            # which the room watcher turns into a stop. With the sender still here it is not.
            if self._sender_identity in (self._room.remote_participants if self._room else {}):
                raise
            logger.debug("session %s: receiver ended after the sender left", self.session_id)

    def _on_received(self, item: rtc.AudioFrame | AudioSegmentEnd) -> None:
        if isinstance(item, AudioSegmentEnd):
            if self._refusing:
                self._refusing = False
                return
            # None after clear_buffer: that segment is already finished.
            if self._recv_segment is not None:
                self._queue.put_nowait(_End(self._recv_segment))
                self._recv_segment = None
            return
        rates = self.behaviour.sample_rates
        if self._refusing or (
            self._recv_segment is None and rates and item.sample_rate not in rates
        ):
            if not self._refusing:
                self._refusing = True
                self.refused_rates.append(item.sample_rate)
                logger.warning(
                    "session %s: a %d Hz segment is not played (this server takes %s)",
                    self.session_id,
                    item.sample_rate,
                    rates,
                )
            return
        now = time.time()
        seg = self._recv_segment
        if seg is None:
            seg = self._recv_segment = self.recorder.begin_segment(
                item.sample_rate, item.num_channels, now
            )
            logger.debug(
                "session %s segment %d started (%d Hz x%d)",
                self.session_id,
                seg.index,
                item.sample_rate,
                item.num_channels,
            )
            self._save()  # a crash mid-segment still leaves its record beside its audio
        self.recorder.write(seg, item.data.cast("B"), item.samples_per_channel, now)
        self._queue.put_nowait(_Frame(seg, item, asyncio.get_running_loop().time()))
        if self._audio_source is not None:
            self._outgoing.put_nowait(item)

    async def _playout_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            item = await self._queue.get()
            seg = item.segment
            if seg.finished:  # discarded by clear_buffer
                continue
            if isinstance(item, _End):
                if seg is self._playing and self._playout is not None:
                    await self._sleep_until(self._playout.ends_at)
                    if seg is self._playing:
                        self._finish_playing(self._playout.scheduled_s, interrupted=False)
                continue
            if seg is not self._playing or self._playout is None:
                self._playing = seg
                # Shares the record's list so underruns land in the recording as they happen.
                self._playout = SegmentPlayout(
                    seg.sample_rate, start=loop.time(), underruns=seg.underruns
                )
            frame = item.frame
            ends_at = self._playout.schedule(frame.samples_per_channel, item.arrived)
            self._level = audio_level(np.frombuffer(frame.data, dtype=np.int16))
            self._level_until = ends_at
            await self._sleep_until(ends_at)

    async def _publish_loop(self, source: rtc.AudioSource) -> None:
        """Publish what it plays, as AvatarRunner does (a recorder in the room hears it): the
        source paces it in real time from the segment's first frame, as the playout does. A
        segment at another rate than the track's stays unheard."""
        while True:
            frame = await self._outgoing.get()
            if frame.sample_rate == source.sample_rate:
                await source.capture_frame(frame)

    async def _sleep_until(self, when: float) -> None:
        """Sleep on the loop clock; clear_buffer cuts it short."""
        loop = asyncio.get_running_loop()
        delay = when - loop.time()
        if delay <= 0:
            return
        fut = self._wake_fut = loop.create_future()
        handle = loop.call_later(delay, _wake, fut)
        try:
            await fut
        finally:
            handle.cancel()
            self._wake_fut = None

    def _finish_playing(self, position: float, *, interrupted: bool) -> None:
        seg = self._playing
        assert seg is not None and self._receiver is not None
        seg.finish(position=position, interrupted=interrupted, at=time.time())
        self._playing = None
        self._playout = None
        self._level_until = 0.0
        behaviour = self.behaviour
        if behaviour.report_playback:
            reported = position * behaviour.report_scale
            for _ in range(2 if behaviour.duplicate_reports else 1):
                self._receiver.notify_playback_finished(reported, interrupted)
        logger.info(
            "session %s segment %d finished: played %.3fs of %.3fs, interrupted=%s, underruns=%d",
            self.session_id,
            seg.index,
            position,
            seg.received_s,
            interrupted,
            len(seg.underruns),
        )
        self._save()

    def _on_clear_buffer(self) -> None:
        """The receiver already dropped its buffered audio; drop ours and report the position."""
        if self._playing is not None and self._playout is not None:
            position = self._playout.position(asyncio.get_running_loop().time())
            self._finish_playing(position, interrupted=True)
        now = time.time()
        while not self._queue.empty():
            seg = self._queue.get_nowait().segment
            if not seg.finished:
                # Never started playing. Like livekit-agents' AvatarRunner, only the segment
                # that was playing is reported to the sender.
                seg.finish(position=0.0, interrupted=True, at=now)
        # Any AudioSegmentEnd still to come belongs to the cleared stream.
        self._recv_segment = None
        while not self._outgoing.empty():
            self._outgoing.get_nowait()
        if self._audio_source is not None:
            self._audio_source.clear_queue()
        if self._wake_fut is not None:
            _wake(self._wake_fut)

    def _route_clear_buffer_to_this_room(self) -> None:
        # DataStreamAudioReceiver keeps clear_buffer handlers in a class-level dict keyed by the
        # sender's identity and dispatches on that alone, so sessions of this process whose
        # senders share an identity (in different rooms) would receive each other's
        # clear_buffer. Bind this room's RPC method directly to this receiver's handler.
        if self._sender_identity is None or self._room is None:
            return
        handler = DataStreamAudioReceiver._clear_buffer_handlers.get(self._sender_identity)
        if handler is not None:
            self._clear_buffer_handler = handler
            self._room.local_participant.register_rpc_method(RPC_CLEAR_BUFFER, handler)

    def _release_clear_buffer_handler(self) -> None:
        # Without this, the class-level dict would keep every finished session's receiver alive.
        handlers = DataStreamAudioReceiver._clear_buffer_handlers
        for identity, handler in list(handlers.items()):
            if handler is self._clear_buffer_handler:
                del handlers[identity]

    # -- video -------------------------------------------------------------------------------

    async def _video_loop(self, source: rtc.VideoSource) -> None:
        loop = asyncio.get_running_loop()
        period = 1.0 / FPS
        next_at = loop.time()
        while True:
            now = loop.time()
            level = self._level if now < self._level_until else 0.0
            source.capture_frame(self._video.render(level))
            # Absolute schedule so frame timing does not drift; never burst after a stall.
            next_at = max(next_at + period, now)
            await asyncio.sleep(next_at - now)

    # -- reporting ---------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        segments = self.recorder.segments
        underruns = [u for s in segments for u in s.underruns]
        wav, sidecar = self.recorder.wav_path, self.recorder.json_path
        return {
            "session_id": self.session_id,
            "state": self.state.value,
            "stop_reason": self.stop_reason,
            "error": self.error,
            "avatar_id": self.avatar_id,
            "room": self.info.room,
            "avatar_participant_identity": self.info.identity,
            "sender_identity": self.info.sender_identity,
            "bound_sender_identity": self._sender_identity,
            "agent_states": list(self.agent_states),
            "refused_rates": list(self.refused_rates),
            "created_at": self.created_at,
            "joined_at": self.joined_at,
            "stopped_at": self.stopped_at,
            "received_audio_s": round(sum(s.received_s for s in segments), 6),
            "segments": [s.to_json() for s in segments],
            "underruns": len(underruns),
            "underrun_s": round(sum(u.duration_s for u in underruns), 6),
            "wav_path": str(wav) if wav else None,
            "json_path": str(sidecar) if sidecar else None,
        }

    def _save(self) -> None:
        self.recorder.save(self.snapshot())
