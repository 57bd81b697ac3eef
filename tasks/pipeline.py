"""The path of one job: source → decode → room → avatar → stream → report.

`play()` runs on the worker process's shared event loop (tasks/runtime.py). It returns the
result dict or raises a JobError; the Celery task (tasks/render.py) decides about retries.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import redis.asyncio as aioredis
from livekit import rtc

from avatarq.errors import (
    AvatarOverLimit,
    AvatarTimeout,
    DecodeError,
    InvalidJob,
    PermanentJobError,
    Reason,
    RoomError,
    TransientJobError,
)
from avatarq.events import Event, Status
from avatarq.ledger.keys import job_waiting_key
from avatarq.results import Played, Timestamps
from avatarq.settings import DEFAULT_AVATAR_SERVER, AvatarServer, Settings
from producers.jobs import Job
from tasks import metrics, tokens
from tasks import room as rooms
from tasks.avatar import START_ANSWER_TIMEOUT_S, AvatarClient, HttpAvatarClient
from tasks.control import Interrupted, JobControl, StopReason
from tasks.decode import PcmDecoder, probe_duration
from tasks.pacing import Pacer
from tasks.quota import AvatarQuota, NoAvatarSlot, Waiting, wait_for_slot
from tasks.report import JobReporter
from tasks.source import aresolve
from tasks.stream import AudioStreamSender
from tasks.warm import AvatarLink, LinkKey, RoomAdmin, warm_pool

log = logging.getLogger("avatarq.pipeline")

#: Audio per write. Each write is an FFI round trip whose completion the SDK hands to every
#: room of the process, so the write rate times the rooms is the cost that grows fastest with
#: streams: in `avatarq bench`, 25 streams of 400 ms chunks cost 14 % less CPU than 200 ms and
#: kept the schedule error p99 at 3 ms instead of 90–150 ms (docs/performance.md). The avatar
#: never holds less than the lead (a chunk is due when the buffer is down to it), and the
#: sender cuts the last chunk into 100 ms pieces (tasks/pacing.py TAIL_SECONDS), so the end
#: overhead does not grow with it; a stop waits at most one chunk.
CHUNK_SECONDS = 0.4
#: Time allowed on top of the audio itself for joining, avatar start and the final report.
OVERHEAD_BUDGET_S = 60.0
#: How long an interrupted job waits for the avatar to report where playback stopped.
INTERRUPT_REPORT_TIMEOUT_S = 2.0
#: How long a cold start waits in its worker slot for an avatar session slot before the job
#: goes back to the queue (its place in the server's line is kept meanwhile).
QUOTA_PATIENCE_S = 5.0
#: A waiting job's status entry outlives the gaps between its polls and requeues.
WAITING_TTL_S = 15
#: Audio the avatar may report short of what was sent before the playback counts as cut off.
PLAYBACK_SHORTFALL_S = 0.5


@dataclass
class Milestones:
    """Wall-clock (epoch seconds) milestones of a job as it goes (results.Timestamps)."""

    picked: float = field(default_factory=time.time)
    room_joined: float | None = None
    avatar_ready: float | None = None
    first_byte: float | None = None
    last_byte: float | None = None
    playback_finished: float | None = None


def time_budget(job: Job, audio_seconds: float | None, settings: Settings) -> float:
    """The job's whole time limit: its audio plus joining, avatar start and reporting."""
    length = audio_seconds or job.max_duration or settings.max_job_duration_s
    waits = settings.avatar_join_timeout_s + settings.playback_finished_timeout_s
    return length + waits + OVERHEAD_BUDGET_S


def avatar_server_for(job: Job, settings: Settings) -> AvatarServer:
    """The configured server the job names; a name the settings lack fails the job alone."""
    try:
        return settings.avatar_server(job.avatar_server)
    except KeyError as e:
        raise InvalidJob(str(e.args[0]), reason=Reason.UNKNOWN_AVATAR_SERVER) from None


_quotas: dict[str, AvatarQuota] = {}


def avatar_quota(settings: Settings, name: str) -> AvatarQuota:
    """This process's handle on the fleet-wide session quota of avatar server `name`."""
    quota = _quotas.get(name)
    if quota is None:
        server = settings.avatar_server(name)
        redis = aioredis.from_url(settings.redis_url)
        quota = _quotas[name] = AvatarQuota(redis, name, server.max_sessions)
    return quota


def avatar_client_for(job: Job, settings: Settings) -> AvatarClient:
    server = avatar_server_for(job, settings)
    return HttpAvatarClient(
        job.avatar_server or DEFAULT_AVATAR_SERVER,
        server.base_url,
        settings.avatar_license_key(server),
        attempts=settings.avatar_start_attempts,
    )


#: Records the avatar session a job started or took over (`Ledger.note_avatar_session`), so a
#: dead worker's session is stopped by recovery: (job id, server name, session id).
SessionNote = Callable[[str, str, str | None], Awaitable[None]]


async def play(
    job: Job,
    settings: Settings,
    reporter: JobReporter,
    control: JobControl,
    *,
    attempt: int,
    note_session: SessionNote,
) -> dict[str, Any]:
    """Play `job` once, start to finish. Raises JobError on failure and `Interrupted` when
    `control` asked it to stop (cancel, hand-back)."""
    ts = Milestones()
    await reporter.emit(Event.STARTED, room=job.room, avatar_id=job.avatar_id, attempt=attempt)

    if not isinstance(job.source, str):
        # Speech is rendered once by the producer (producers.tts), never by a worker.
        raise InvalidJob("tts sources must be rendered by the producer before they are queued")
    server = avatar_server_for(job, settings)
    resolved = await aresolve(job.source, settings)
    duration = await probe_duration(resolved, settings)
    limit = job.max_duration or settings.max_job_duration_s
    if duration is not None and duration > limit:
        raise DecodeError(
            f"audio is {duration:.1f}s long, over the {limit:g}s maximum", reason=Reason.TOO_LONG
        )

    lead = settings.default_lead_s if job.lead is None else job.lead
    # What the avatar server expects, whatever the source's rate: ffmpeg resamples.
    sample_rate = server.sample_rate
    chunk_bytes = int(sample_rate * CHUNK_SECONDS) * 2

    async with asyncio.timeout(time_budget(job, duration, settings)):
        # The limit holds while decoding too (many files do not declare their length), and a
        # file that decodes clearly short of its declared length fails as truncated_audio.
        decoder = PcmDecoder(
            resolved,
            sample_rate=sample_rate,
            settings=settings,
            max_seconds=limit,
            expected_seconds=duration,
        )
        async with decoder:
            chunks = decoder.chunks(chunk_bytes)
            # Decode the first chunk before joining anything: a bad file fails here, cheaply
            # (audio that decodes to nothing ends the decoder with DecodeError `no_audio`).
            first = await anext(chunks)

            key = link_key(job, settings)
            pool = warm_pool(settings.redis_url)
            link = await pool.take(key) if settings.warm_idle_s > 0 else None
            warm = link is not None
            if link is None:
                link = await start_link(job, settings, key, duration, ts, reporter, note_session)
            else:
                ts.room_joined = ts.avatar_ready = time.time()
                session_id = link.session.session_id if link.session else None
                await note_session(job.job_id, key[2], session_id)
            link.attach(control)
            session = link.session
            sender = link.sender
            await reporter.emit(
                Event.AVATAR_READY, session_id=session.session_id if session else None, warm=warm
            )
            keep = False
            metrics.STREAMS_IN_FLIGHT.inc()
            try:
                bps = sender.bytes_per_second

                async def pcm() -> Any:
                    yield first
                    ts.first_byte = time.time()
                    async for chunk in chunks:
                        yield chunk

                async def on_progress(sent: int) -> None:
                    pacing.observe(sent)
                    reporter.progress_nowait(sent / bps, duration)

                pacer = Pacer(bytes_per_second=bps, lead=lead, record_errors=settings.pacing_trace)
                pacing = metrics.PacingProbe(pacer)
                try:
                    sent = await sender.send_segment(
                        pcm(), pacer, on_progress=on_progress, stop=control.stop, name=job.job_id
                    )
                except Exception as e:
                    if control.reason is not StopReason.ROOM_LOST:
                        raise
                    raise RoomError(f"lost the LiveKit room while streaming: {e}") from None
                finally:
                    await reporter.settle_progress()
                ts.last_byte = ended = time.time()
                streamed = sent / bps
                await reporter.progress(streamed, duration, force=True)
                if control.reason is not None:
                    await _interrupt(
                        sender,
                        control.reason,
                        stopped_at=ended,
                        streamed=streamed,
                        duration=duration,
                    )

                # The avatar still has up to `lead` seconds buffered when the last byte leaves.
                finished = await sender.wait_playback_finished(
                    lead + settings.playback_finished_timeout_s
                )
                if finished is not None:
                    ts.playback_finished = time.time()
                    _check_complete(finished.playback_position, streamed, attempt=attempt)
                else:
                    log.warning("job %s: no lk.playback_finished from the avatar", job.job_id)
                # Only a segment that ended cleanly leaves the session fit for the next job.
                keep = settings.warm_idle_s > 0 and finished is not None
            finally:
                metrics.STREAMS_IN_FLIGHT.dec()
                if keep and link.reusable:
                    await pool.park(link, settings.warm_idle_s)
                else:
                    await link.close()

    # A listening avatar got every byte but never said it played them (livekit-agents has
    # known cases of a lost report): not a plain success, and not replayed either.
    confirmed = finished is not None
    played = Played(
        job_id=job.job_id,
        status=Status.COMPLETED.value if confirmed else Status.UNCONFIRMED.value,
        reason=None if confirmed else Reason.PLAYBACK_UNCONFIRMED,
        room=job.room,
        avatar_id=job.avatar_id,
        audio_duration=duration if duration is not None else decoder.decoded_seconds,
        seconds_streamed=round(streamed, 6),
        playback_position=finished.playback_position if finished else None,
        interrupted=finished.interrupted if finished else None,
        playback_confirmed=confirmed,
        avatar_server=job.avatar_server or DEFAULT_AVATAR_SERVER,
        avatar_session_id=session.session_id if session else None,
        warm=warm,
        attempt=attempt,
        lead=lead,
        sample_rate=sample_rate,
        metadata=job.metadata,
        timestamps=Timestamps(**asdict(ts)),
        # Benchmarks only (AVATARQ_PACING_TRACE): the sender's schedule error of every chunk.
        pacing_errors_ms=[round(e * 1000, 2) for e in pacer.errors]
        if pacer.record_errors
        else None,
    )
    return played.as_record()


def link_key(job: Job, settings: Settings) -> LinkKey:
    server = avatar_server_for(job, settings)
    return (
        job.room,
        job.avatar_identity,
        job.avatar_server or DEFAULT_AVATAR_SERVER,
        server.sample_rate,
    )


async def start_link(
    job: Job,
    settings: Settings,
    key: LinkKey,
    duration: float | None,
    ts: Milestones,
    reporter: JobReporter,
    note_session: SessionNote,
) -> AvatarLink:
    """A cold start within the avatar server's session quota: wait for a slot (briefly:
    `NoAvatarSlot` sends the job back to the queue), then open the link, which holds the
    slot until it closes."""
    quota = avatar_quota(settings, key[2])

    async def on_wait(waiting: Waiting) -> None:
        info = {
            "server": key[2],
            "place": waiting.place + 1,
            "sessions": waiting.sessions,
            "quota": waiting.quota,
        }
        await reporter.emit(Event.WAITING_FOR_AVATAR, **info)
        await quota.redis.set(job_waiting_key(job.job_id), json.dumps(info), ex=WAITING_TTL_S)

    slot = await wait_for_slot(quota, job.job_id, patience_s=QUOTA_PATIENCE_S, on_wait=on_wait)
    # Also clears what an earlier, requeued try of this job left.
    await quota.redis.delete(job_waiting_key(job.job_id))
    try:
        await warm_pool(settings.redis_url).make_room(key)
        link = await open_link(job, settings, key, duration, ts, note_session)
    except AvatarOverLimit as e:
        # Refused under our quota: the server's real limit is lower. Shrink, and wait again.
        await quota.release(slot)
        cap = await quota.shrink()
        raise NoAvatarSlot(key[2], Waiting(place=0, sessions=cap, quota=cap)) from e
    except BaseException:
        await quota.release(slot)
        raise
    link.hold_slot(quota, slot)
    return link


async def open_link(
    job: Job,
    settings: Settings,
    key: LinkKey,
    duration: float | None,
    ts: Milestones,
    note_session: SessionNote,
) -> AvatarLink:
    """Join the room (with its keeper), start the avatar and wait until it listens to us;
    ready to stream when it returns."""
    job_tokens = tokens.mint(
        settings,
        room=job.room,
        worker_identity=job.worker_identity,
        avatar_identity=job.avatar_identity,
        ttl=tokens.ttl_for(duration, settings),
    )
    joined = await asyncio.gather(
        rooms.connect(settings.livekit_url, job_tokens.worker),
        rooms.connect(settings.livekit_url, job_tokens.keeper),
        return_exceptions=True,
    )
    room, keeper = joined
    if isinstance(room, BaseException) or isinstance(keeper, BaseException):
        for joined_room in joined:
            if isinstance(joined_room, rtc.Room):
                await rooms.disconnect(joined_room)
        raise room if isinstance(room, BaseException) else keeper  # type: ignore[misc]
    ts.room_joined = time.time()
    admin = RoomAdmin(
        settings.livekit_url,
        settings.livekit_api_key,
        settings.livekit_api_secret.get_secret_value(),
    )
    sender = AudioStreamSender(room, job.avatar_identity, key[3])
    link = AvatarLink(key, room, sender, avatar_client_for(job, settings), admin, keeper=keeper)
    # Fired only once the SDK gave up reconnecting: the room is lost for good.
    room.on("disconnected", lambda *_: link.lost(StopReason.ROOM_LOST))
    # An earlier session of this avatar still leaving the room is not ours.
    stale = rooms.session_of(room, job.avatar_identity)
    try:
        link.session = await link.avatar.start(
            livekit_url=settings.livekit_url,
            livekit_token=job_tokens.avatar,
            avatar_id=job.avatar_id,
            avatar_identity=job.avatar_identity,
        )
        await note_session(job.job_id, key[2], link.session.session_id)
        identity = link.session.participant_identity
        join_timeout = settings.avatar_join_timeout_s
        if not link.session.acknowledged:
            # The start answer was lost: a cold start may take the whole answer timeout.
            join_timeout += START_ANSWER_TIMEOUT_S
        await rooms.wait_for_avatar(room, identity, timeout=join_timeout, not_sid=stale)
        await rooms.wait_until_listening(room, identity, timeout=settings.avatar_join_timeout_s)
    except BaseException:
        await link.close()
        raise
    ts.avatar_ready = time.time()
    rooms.on_leave(room, identity, link.lost, StopReason.AVATAR_LEFT)
    return link


async def _interrupt(
    sender: AudioStreamSender,
    reason: StopReason,
    *,
    stopped_at: float,
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
        stopped_at=stopped_at,
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
        raise TransientJobError(message, reason=Reason.INCOMPLETE_PLAYBACK)
    raise PermanentJobError(
        f"{message}, again after a replay: not replayed a second time",
        reason=Reason.INCOMPLETE_PLAYBACK,
    )
