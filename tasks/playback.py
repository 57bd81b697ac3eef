"""Playing a claimed job once: source → decode → link (room + avatar) → stream → confirm.

`Playback.play()` returns the `Played` result or raises: a `JobError` (the run decides about
retries), `Interrupted` when the job's control asked it to stop (cancel, hand-back), or
`NoAvatarSlot` when the avatar server has no free session for it now. Each step is a method
named for what it does; the parts it uses (audio, links, hooks) are given to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator

from redis.exceptions import RedisError

from avatarq.budget import Budget
from avatarq.errors import (
    AvatarTimeout,
    DecodeError,
    IncompletePlayback,
    InvalidJob,
    PermanentJobError,
    Reason,
    RoomError,
)
from avatarq.events import AvatarReady, JobStarted, Status
from avatarq.jobs import parse_job, resolve_server
from avatarq.results import Played
from avatarq.settings import AvatarServer, Settings
from tasks.captions import attempt_cues
from tasks.context import PlayContext, Segment
from tasks.control import Interrupted, StopReason
from tasks.link.pacing import Pacer
from tasks.link.stream import CHUNK_SECONDS
from tasks.link.types import Link, LinkRequest, LinkSource, PlaybackFinished, Sender
from tasks.seams import Audio, AudioOpener, AudioSpec

log = logging.getLogger("avatarq.playback")

#: How long an interrupted job waits for the avatar to report where playback stopped.
INTERRUPT_REPORT_TIMEOUT_S = 2.0
#: Audio the avatar may report short of what was sent before the playback counts as cut off.
PLAYBACK_SHORTFALL_S = 0.5


class Playback:
    """The steps of one play of a job, on the parts it is given."""

    def __init__(self, settings: Settings, *, audio: AudioOpener, links: LinkSource) -> None:
        self.settings = settings
        self.audio = audio
        self.links = links

    async def play(self, play: PlayContext) -> Played:
        """Play the job from `play.start_at` seconds into its source (0: from the beginning)."""
        job, budget = play.job, play.budget
        await play.reporter.emit(
            JobStarted(room=job.room, avatar_id=job.avatar_id, attempt=play.attempt)
        )
        server = resolve_server(job, self.settings)
        chunk_bytes = int(server.sample_rate * CHUNK_SECONDS) * 2
        # Bounded from the start by the longest the job may be; tightened once its length is
        # known.
        spec = AudioSpec(budget.max_length, server.sample_rate, chunk_bytes, play.start_at)
        request = LinkRequest(
            job,
            server,
            budget,
            None,  # the source's length: known once it opens
            play.timestamps,
            play.ledger.note_avatar_session,
            play.reporter.emit,
            play.control.stop,
        )
        # A remote source's open waits on the network: the room is joined meanwhile. A local
        # one's is an ffmpeg start, whose CPU a join beside it only contends with (a burst's
        # first audio came 0.04 s later on average, docs/performance.md).
        joining = self.links.joining(request) if job.remote_source else contextlib.nullcontext()
        async with asyncio.timeout(budget.time_limit(None)) as limit:
            async with joining, self.audio.open(job, spec) as audio:
                _check_length(audio, budget.max_length)
                remainder = _remainder(audio.duration, play.start_at)
                loop = asyncio.get_running_loop()
                limit.reschedule(loop.time() + budget.time_limit(remainder))
                request = dataclasses.replace(request, duration=remainder)
                link, warm = await self._get_link(request)
                keep = False
                try:
                    segment, streamed, finished = await self._play_on(play, link, warm, audio, spec)
                    # Only a segment that ended cleanly leaves the session fit for the next job.
                    keep = finished is not None
                finally:
                    # Whatever stopped the play, from here on the link is given back: one
                    # left behind would hold its session slot for as long as the process lives.
                    await self.links.give_back(link, keep=keep)
        return _result(play, server, link, warm, audio, segment, streamed, finished)

    async def _play_on(
        self, play: PlayContext, link: Link, warm: bool, audio: Audio, spec: AudioSpec
    ) -> tuple[Segment, float, PlaybackFinished | None]:
        """Stream the job on its link and wait for the avatar's report: the segment, the
        seconds streamed and the report (None when the avatar never sent one)."""
        link.attach(play.control)
        await play.reporter.emit(AvatarReady(session_id=link.session_id, warm=warm))
        bps = link.sender.bytes_per_second
        pacer = Pacer(
            bytes_per_second=bps, lead=play.budget.lead, record_errors=self.settings.pacing_trace
        )
        segment = Segment(play.job, bps, audio.duration, pacer, play.start_at, link.sender.captions)
        for hook in play.hooks:
            await hook.on_link_ready()
        for hook in play.hooks:
            hook.on_stream_start(segment)
        try:
            streamed = await self._stream(play, link.sender, audio, segment)
            # The avatar still plays the lead: time to get the room's next job ready.
            await self._prepare_next(play, spec)
            # No progress report may land after this last one.
            await play.reporter.settle_progress()
            await play.reporter.progress(streamed, audio.duration, force=True)
            if play.control.reason is not None:
                await _interrupt(play, link.sender, streamed, audio.duration)
            return segment, streamed, await self._confirm(play, link.sender, streamed)
        finally:
            await play.reporter.settle_progress()  # nor after the job's end
            for hook in play.hooks:
                hook.on_stream_end(segment)

    async def _prepare_next(self, play: PlayContext, spec: AudioSpec) -> None:
        """Start decoding the job parked next in the room, if it plays at this rate from its
        beginning (anything else opens as usual when its turn comes)."""
        try:
            payload = await play.ledger.next_in_room(play.job.room)
            if payload is None:
                return
            job = parse_job(payload, self.settings)
            if resolve_server(job, self.settings).sample_rate != spec.sample_rate:
                return
        except (InvalidJob, RedisError):
            return  # its own run meets and reports it
        max_seconds = Budget.of(job, self.settings).max_length
        self.audio.prepare(job, AudioSpec(max_seconds, spec.sample_rate, spec.chunk_bytes))

    async def _get_link(self, request: LinkRequest) -> tuple[Link, bool]:
        """The room with a listening avatar: this process's idle one, else a cold start."""
        link = await self.links.take_warm(request)
        if link is not None:
            request.timestamps.room_joined = request.timestamps.avatar_ready = time.time()
            await request.note_session(request.job.job_id, request.server.name, link.session_id)
            return link, True
        return await self.links.start_cold(request), False

    async def _stream(
        self, play: PlayContext, sender: Sender, audio: Audio, segment: Segment
    ) -> float:
        """Send the audio, paced; returns the seconds sent (all, or up to a stop)."""
        control, ts = play.control, play.timestamps

        async def pcm() -> AsyncIterator[bytes]:
            yield audio.first
            ts.first_byte = time.time()
            async for chunk in audio.rest:
                yield chunk

        async def on_progress(sent: int) -> None:
            for hook in play.hooks:
                hook.on_chunk_sent(segment, sent)

        async def admit(until: int) -> None:
            await control.admit(segment.start_at + until / segment.bytes_per_second)

        try:
            sent = await sender.send_segment(
                pcm(), segment.pacer, on_progress=on_progress, stop=control.stop,
                admit=admit, name=segment.job.job_id,
            )  # fmt: skip
        except Exception as e:
            if control.reason is not StopReason.ROOM_LOST:
                raise
            raise RoomError(f"lost the LiveKit room while streaming: {e}") from None
        ts.last_byte = time.time()
        return sent / segment.bytes_per_second

    async def _confirm(
        self, play: PlayContext, sender: Sender, streamed: float
    ) -> PlaybackFinished | None:
        """The avatar's report that it played the segment, checked against what was sent."""
        # The avatar still has up to `lead` seconds buffered when the last byte leaves.
        timeout = play.budget.lead + self.settings.playback_finished_timeout_s
        finished = await sender.wait_playback_finished(timeout)
        if finished is None:
            log.warning("no lk.playback_finished from the avatar within %.1fs", timeout)
            return None
        play.timestamps.playback_finished = time.time()
        _check_complete(finished.playback_position, streamed, attempt=play.attempt)
        return finished


def _remainder(duration: float | None, start_at: float) -> float | None:
    """The seconds left to play from `start_at` (None when the length is unknown)."""
    return None if duration is None else max(0.0, duration - start_at)


def _check_length(audio: Audio, limit: float) -> None:
    """A source that declares a length over the limit fails before its avatar is asked for
    (one that does not is cut off by the decoder when it passes the limit)."""
    if audio.duration is not None and audio.duration > limit:
        raise DecodeError(
            f"audio is {audio.duration:.1f}s long, over the {limit:g}s maximum",
            reason=Reason.TOO_LONG,
        )


async def _interrupt(
    play: PlayContext, sender: Sender, streamed: float, duration: float | None
) -> None:
    """Stop the avatar mid-segment and raise how far it got."""
    reason = play.control.reason
    total = f" of {duration:.1f}s" if duration else ""
    if reason is StopReason.ROOM_LOST:
        raise RoomError(f"lost the LiveKit room after {streamed:.1f}s{total} streamed")
    if reason is StopReason.AVATAR_LEFT:
        raise AvatarTimeout(
            f"the avatar left the room after {streamed:.1f}s{total} streamed",
            reason=Reason.AVATAR_LEFT,
        )
    # The sender cleared the avatar's buffer before closing the stream.
    finished = await sender.wait_playback_finished(INTERRUPT_REPORT_TIMEOUT_S)
    assert reason is not None, "only a stopped play is interrupted"
    raise Interrupted(
        reason,
        stopped_at=play.timestamps.last_byte or time.time(),
        seconds_streamed=streamed,
        playback_position=finished.playback_position if finished else None,
    )


def _check_complete(position: float, streamed: float, *, attempt: int) -> None:
    """An avatar that played clearly less than it was sent lost audio on the way (a LiveKit
    reconnect that did not resume the stream): play the job again rather than report it
    done, but only once: an avatar that under-reports would otherwise make viewers hear the
    same clip again and again."""
    if position >= streamed - PLAYBACK_SHORTFALL_S:
        return
    message = f"the avatar played {position:.1f}s of the {streamed:.1f}s sent"
    if attempt <= 1:
        raise IncompletePlayback(message, heard_s=position)
    raise PermanentJobError(
        f"{message}, again after a replay: not replayed a second time",
        reason=Reason.INCOMPLETE_PLAYBACK,
    )


def _result(
    play: PlayContext,
    server: AvatarServer,
    link: Link,
    warm: bool,
    audio: Audio,
    segment: Segment,
    streamed: float,
    finished: PlaybackFinished | None,
) -> Played:
    # A listening avatar got every byte but never said it played them (livekit-agents has
    # known cases of a lost report): not a plain success, and not replayed either.
    confirmed = finished is not None
    job, pacer = play.job, segment.pacer
    return Played(
        job_id=job.job_id,
        status=Status.COMPLETED.value if confirmed else Status.UNCONFIRMED.value,
        reason=None if confirmed else Reason.PLAYBACK_UNCONFIRMED,
        room=job.room,
        avatar_id=job.avatar_id,
        audio_duration=audio.duration
        if audio.duration is not None
        else segment.start_at + audio.decoded_seconds(),
        seconds_streamed=round(streamed, 6),
        started_at=segment.start_at,
        ended_at=round(
            segment.start_at + (finished.playback_position if finished else streamed), 6
        ),
        playback_position=finished.playback_position if finished else None,
        interrupted=finished.interrupted if finished else None,
        playback_confirmed=confirmed,
        avatar_server=server.name,
        avatar_session_id=link.session_id,
        warm=warm,
        attempt=play.attempt,
        lead=play.budget.lead,
        sample_rate=server.sample_rate,
        metadata=job.metadata,
        timestamps=play.timestamps.model_copy(),
        # Benchmarks only (AVATARQ_PACING_TRACE): the sender's schedule error of every chunk.
        pacing_errors_ms=[round(e * 1000, 2) for e in pacer.errors]
        if pacer.record_errors
        else None,
        captions=len(attempt_cues(job, audio.duration, segment.start_at))
        if job.transcript
        else None,
    )
