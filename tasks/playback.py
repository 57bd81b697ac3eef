"""Playing a claimed job once: source → decode → link (room + avatar) → stream → confirm.

`Playback.play()` returns the `Played` result or raises: a `JobError` (the run decides about
retries), `Interrupted` when the job's control asked it to stop (cancel, hand-back), or
`NoAvatarSlot` when the avatar server has no free session for it now. Each step is a method
named for what it does; the parts it uses (audio, links, hooks) are given to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import asdict

from avatarq.budget import length_limit, time_budget
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
from avatarq.jobs import Job
from avatarq.results import Played, Timestamps
from avatarq.settings import Settings
from tasks.control import Interrupted, JobControl, StopReason
from tasks.decode import PcmDecoder, probe_duration
from tasks.hooks import JobHook, Segment
from tasks.link.link import Milestones, NamedServer, SessionNote
from tasks.link.stream import CHUNK_SECONDS, PlaybackFinished
from tasks.pacing import Pacer
from tasks.runahead import RUN_AHEAD_S, RunAhead
from tasks.seams import Audio, AudioOpener, Link, LinkSource, Reporter, Sender, ServerResolver
from tasks.source import aresolve

log = logging.getLogger("avatarq.playback")

#: How long an interrupted job waits for the avatar to report where playback stopped.
INTERRUPT_REPORT_TIMEOUT_S = 2.0
#: Audio the avatar may report short of what was sent before the playback counts as cut off.
PLAYBACK_SHORTFALL_S = 0.5


class FfmpegAudio:
    """Opens a job's source with ffmpeg (tasks/decode.py), resampled to the avatar's rate.

    ffprobe (the declared length) runs beside the decoder's start rather than before it: on
    free cores a warm job's start waits for the slower of the two, not their sum (on busy
    ones the two spawns compete for the CPU, docs/performance.md). The length limit
    holds while decoding too (many files declare no length), and a file that decodes clearly
    short of its declared length fails as truncated_audio. The decoder runs up to
    RUN_AHEAD_S ahead of playback (tasks/runahead.py): a brief source stall is not heard,
    a long one ends the segment with `source_stalled`."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    @contextlib.asynccontextmanager
    async def open(
        self, job: Job, *, sample_rate: int, chunk_bytes: int, start_at: float = 0.0
    ) -> AsyncIterator[Audio]:
        if not isinstance(job.source, str):
            # Speech is rendered once by the producer (producers.tts), never by a worker.
            raise InvalidJob("tts sources must be rendered by the producer before they are queued")
        resolved = await aresolve(job.source, self.settings)
        limit = length_limit(job, self.settings)
        probe = asyncio.create_task(probe_duration(resolved, self.settings))
        decoder = PcmDecoder(
            resolved,
            sample_rate=sample_rate,
            settings=self.settings,
            max_seconds=limit,
            start_at=start_at,
        )
        max_chunks = max(1, int(RUN_AHEAD_S * sample_rate * 2 / chunk_bytes))
        try:
            async with decoder:
                chunks = decoder.chunks(chunk_bytes)
                # Audio that decodes to nothing ends the decoder with DecodeError `no_audio`.
                first = await anext(chunks)
                duration = decoder.expected_seconds = await probe
                async with RunAhead(chunks, max_chunks=max_chunks) as ahead:
                    yield Audio(duration, first, aiter(ahead), lambda: decoder.decoded_seconds)
        finally:
            probe.cancel()


class Playback:
    """The steps of one play of a job, on the parts it is given."""

    def __init__(
        self,
        settings: Settings,
        *,
        audio: AudioOpener,
        links: LinkSource,
        resolve_server: ServerResolver,
    ) -> None:
        self.settings = settings
        self.audio = audio
        self.links = links
        self.resolve_server = resolve_server

    async def play(
        self,
        job: Job,
        *,
        reporter: Reporter,
        control: JobControl,
        hooks: Sequence[JobHook],
        attempt: int,
        note_session: SessionNote,
        start_at: float = 0.0,
    ) -> Played:
        """Play the job from `start_at` seconds into its source (0: from the beginning)."""
        ts = Milestones()
        await reporter.emit(JobStarted(room=job.room, avatar_id=job.avatar_id, attempt=attempt))
        server = self.resolve_server(job)
        lead = self.settings.default_lead_s if job.lead is None else job.lead
        chunk_bytes = int(server.sample_rate * CHUNK_SECONDS) * 2
        # Bounded from the start by the longest the job may be; tightened once its length is
        # known.
        async with asyncio.timeout(time_budget(job, None, self.settings)) as budget:
            opened = self.audio.open(
                job, sample_rate=server.sample_rate, chunk_bytes=chunk_bytes, start_at=start_at
            )
            async with opened as audio:
                _check_length(job, audio, self.settings)
                remainder = _remainder(audio.duration, start_at)
                loop = asyncio.get_running_loop()
                budget.reschedule(loop.time() + time_budget(job, remainder, self.settings))
                link, warm = await self._get_link(
                    job, server, remainder, ts, reporter, note_session
                )
                link.attach(control)
                await reporter.emit(AvatarReady(session_id=link.session_id, warm=warm))
                bps = link.sender.bytes_per_second
                pacer = Pacer(
                    bytes_per_second=bps, lead=lead, record_errors=self.settings.pacing_trace
                )
                segment = Segment(job, bps, audio.duration, pacer, start_at=start_at)
                for hook in hooks:
                    hook.on_stream_start(segment)
                keep = False
                try:
                    streamed = await self._stream(link.sender, audio, segment, control, ts, hooks)
                    # No progress report may land after this last one.
                    await reporter.settle_progress()
                    await reporter.progress(streamed, audio.duration, force=True)
                    if control.reason is not None:
                        await _interrupt(link.sender, control.reason, ts, streamed, audio.duration)
                    finished = await self._confirm(link.sender, lead, streamed, attempt, ts)
                    # Only a segment that ended cleanly leaves the session fit for the next job.
                    keep = finished is not None
                finally:
                    await reporter.settle_progress()  # nor after the job's end
                    for hook in hooks:
                        hook.on_stream_end(segment)
                    await self.links.give_back(link, keep=keep)
        return _result(job, server, audio, link, warm, segment, streamed, finished, ts,
                       lead=lead, attempt=attempt)  # fmt: skip

    async def _get_link(
        self,
        job: Job,
        server: NamedServer,
        duration: float | None,
        ts: Milestones,
        reporter: Reporter,
        note_session: SessionNote,
    ) -> tuple[Link, bool]:
        """The room with a listening avatar: this process's idle one, else a cold start."""
        link = await self.links.take_warm(job, server, duration=duration)
        if link is not None:
            ts.room_joined = ts.avatar_ready = time.time()
            await note_session(job.job_id, server.name, link.session_id)
            return link, True
        link = await self.links.start_cold(
            job,
            server,
            duration=duration,
            ts=ts,
            reporter=reporter,
            note_session=note_session,
        )
        return link, False

    async def _stream(
        self,
        sender: Sender,
        audio: Audio,
        segment: Segment,
        control: JobControl,
        ts: Milestones,
        hooks: Sequence[JobHook],
    ) -> float:
        """Send the audio, paced; returns the seconds sent (all, or up to a stop)."""

        async def pcm() -> AsyncIterator[bytes]:
            yield audio.first
            ts.first_byte = time.time()
            async for chunk in audio.rest:
                yield chunk

        async def on_progress(sent: int) -> None:
            for hook in hooks:
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
        self, sender: Sender, lead: float, streamed: float, attempt: int, ts: Milestones
    ) -> PlaybackFinished | None:
        """The avatar's report that it played the segment, checked against what was sent."""
        # The avatar still has up to `lead` seconds buffered when the last byte leaves.
        timeout = lead + self.settings.playback_finished_timeout_s
        finished = await sender.wait_playback_finished(timeout)
        if finished is None:
            log.warning("no lk.playback_finished from the avatar within %.1fs", timeout)
            return None
        ts.playback_finished = time.time()
        _check_complete(finished.playback_position, streamed, attempt=attempt)
        return finished


def _remainder(duration: float | None, start_at: float) -> float | None:
    """The seconds left to play from `start_at` (None when the length is unknown)."""
    return None if duration is None else max(0.0, duration - start_at)


def _check_length(job: Job, audio: Audio, settings: Settings) -> None:
    """A source that declares a length over the limit fails before any room is joined (one
    that does not is cut off by the decoder when it passes the limit)."""
    limit = length_limit(job, settings)
    if audio.duration is not None and audio.duration > limit:
        raise DecodeError(
            f"audio is {audio.duration:.1f}s long, over the {limit:g}s maximum",
            reason=Reason.TOO_LONG,
        )


async def _interrupt(
    sender: Sender,
    reason: StopReason,
    ts: Milestones,
    streamed: float,
    duration: float | None,
) -> None:
    """Stop the avatar mid-segment and raise how far it got."""
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
    raise Interrupted(
        reason,
        stopped_at=ts.last_byte or time.time(),
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
    job: Job,
    server: NamedServer,
    audio: Audio,
    link: Link,
    warm: bool,
    segment: Segment,
    streamed: float,
    finished: PlaybackFinished | None,
    ts: Milestones,
    *,
    lead: float,
    attempt: int,
) -> Played:
    # A listening avatar got every byte but never said it played them (livekit-agents has
    # known cases of a lost report): not a plain success, and not replayed either.
    confirmed = finished is not None
    pacer = segment.pacer
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
        attempt=attempt,
        lead=lead,
        sample_rate=server.sample_rate,
        metadata=job.metadata,
        timestamps=Timestamps(**asdict(ts)),
        # Benchmarks only (AVATARQ_PACING_TRACE): the sender's schedule error of every chunk.
        pacing_errors_ms=[round(e * 1000, 2) for e in pacer.errors]
        if pacer.record_errors
        else None,
    )
