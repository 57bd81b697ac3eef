"""The worker's hooks on a job's play (in the manner of dramatiq's middleware): `LeaseWatch`
renews the lease and stops the job on cancel, hand-back or take-over; `StreamMetrics` feeds
Prometheus; `ProgressReports` sends progress; `tasks.recording` records the jobs that ask.
The hook points are `tasks.context.JobHook`'s."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from redis.exceptions import RedisError

from avatarq.jobs import Job
from avatarq.ledger.types import Progress
from avatarq.redisclient import cancel_and_wait
from avatarq.settings import Settings
from tasks import metrics
from tasks.captions import CaptionCues
from tasks.context import HookFactory, JobHook, PlayContext, Segment
from tasks.control import JobControl, StopReason
from tasks.recording import recording_hooks
from tasks.seams import JobLedger, Reporter

log = logging.getLogger("avatarq.hooks")

#: How long an avatar's leave may take to reach the sender, counted off what it heard (a
#: margin: the emulator's leave arrives within tens of milliseconds).
AVATAR_LEAVE_NEWS_S = 0.25
#: How often a playing job renews its lease and checks for cancel and hand-back: a stop
#: comes within half a second. A stream at its fence asks for a tick sooner.
WATCH_INTERVAL_S = 0.25
#: How far past what its last confirmed tick recorded a stream may send (source seconds). A
#: redelivery resumes from that record, so it bounds what a worker cut off from the ledger
#: makes heard twice; it is a 400 ms chunk plus a tick's slack, so a healthy stream never
#: waits.
SEND_AHEAD_OF_LEASE_S = 0.5
#: A tick whose answer has not come in this long failed: its connection may be one nothing
#: answers (avatarq/redisclient.py), and the stream waits at its fence meanwhile.
WATCH_TIMEOUT_S = 1.5


class LeaseWatch(JobHook):
    """Every tick while the job plays: renew (or restore) its lease and its hold on the room;
    stop it on a cancel request, once the worker's shutdown grace is over, or when another
    delivery took it over (this worker was taken for dead)."""

    def __init__(
        self,
        ledger: JobLedger,
        job: Job,
        token: str,
        control: JobControl,
        shutting_down: Callable[[], bool],
        interval_s: float = WATCH_INTERVAL_S,
    ) -> None:
        self.ledger, self.job, self.token, self.control = ledger, job, token, control
        self.shutting_down = shutting_down
        self.interval_s = interval_s
        self.attempt = 1
        #: Where the attempt is in the source, recorded with each renewal (the checkpoint).
        self.progress: Progress | None = None
        self._segment: Segment | None = None
        self._task: asyncio.Task[None] | None = None
        #: When a tick (or the claim) last confirmed the lease is this attempt's.
        self._confirmed_at = 0.0

    @classmethod
    def factory(
        cls, shutting_down: Callable[[], bool], interval_s: float = WATCH_INTERVAL_S
    ) -> HookFactory:
        def make(run: PlayContext) -> JobHook:
            watch = cls(run.ledger, run.job, run.token, run.control, shutting_down, interval_s)
            watch.attempt = run.attempt
            return watch

        return make

    async def on_claimed(self) -> None:
        self._confirmed_at = time.monotonic()
        self._task = asyncio.create_task(self._watch())

    def on_stream_start(self, segment: Segment) -> None:
        # Fenced from the first byte: a lease confirmed a moment ago lets the first chunk go
        # at once; otherwise the stream waits for a tick that confirms it (asked for at once,
        # JobControl.fenced).
        self._segment = segment
        fresh = time.monotonic() - self._confirmed_at < 2 * self.interval_s
        self.control.grant(segment.start_at + (SEND_AHEAD_OF_LEASE_S if fresh else 0.0))

    def on_chunk_sent(self, segment: Segment, sent: int) -> None:
        played, out = (
            segment.played_position(sent),
            segment.start_at + sent / segment.bytes_per_second,
        )
        self.progress = Progress(self.attempt, segment.start_at, played, out)
        self._segment = segment

    async def on_released(self) -> None:
        # Awaited: a tick still running after the run let go of its lease must not renew it.
        if self._task is not None:
            await cancel_and_wait(self._task)
        if self.control.reason is StopReason.AVATAR_LEFT:
            await self._record_where_the_avatar_left()

    async def _record_where_the_avatar_left(self) -> None:
        """The avatar left with its buffer: it heard what real time allowed until it left,
        less the time the news of its leaving took to reach the sender."""
        segment, progress, at = self._segment, self.progress, self.control.requested_at
        if segment is None or progress is None or at is None or segment.pacer.t0 is None:
            return
        by_clock = at - segment.pacer.t0 - AVATAR_LEAVE_NEWS_S
        heard = min(segment.start_at + max(0.0, by_clock), progress.position)
        final = Progress(self.attempt, segment.start_at, heard, heard)
        with contextlib.suppress(RedisError, OSError):
            await self.ledger.watch(self.job.job_id, self.job.room, self.token, final)

    async def _watch(self) -> None:
        fenced = self.control.fenced
        while self.control.reason is None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.interval_s):
                    await fenced.wait()
            fenced.clear()
            if self.shutting_down():
                self.control.request_stop(StopReason.HANDED_BACK)
                return
            progress = self.progress  # what this tick records, and so what it grants from
            try:
                async with asyncio.timeout(WATCH_TIMEOUT_S):
                    cancel, ours = await self.ledger.watch(
                        self.job.job_id, self.job.room, self.token, progress
                    )
            except (RedisError, OSError, TimeoutError) as e:
                # Keep playing through a Redis outage; the lease outlives a short one.
                log.warning("job %s: ledger unreachable: %s", self.job.job_id, e or "timeout")
                continue
            if ours:
                self._confirmed_at = time.monotonic()
                if self._segment is not None:
                    recorded = progress.sent if progress is not None else self._segment.start_at
                    self.control.grant(recorded + SEND_AHEAD_OF_LEASE_S)
            if cancel:
                self.control.request_stop(StopReason.CANCELLED)
            elif not ours:
                log.warning("job %s: its lease was taken over by another delivery; stopping",
                            self.job.job_id)  # fmt: skip
                self.control.request_stop(StopReason.HANDED_BACK, taken_over=True)
                return


class StreamMetrics(JobHook):
    """Streams in flight and the sender's schedule error, for Prometheus (tasks/metrics.py)."""

    def __init__(self) -> None:
        self._probe: metrics.PacingProbe | None = None

    def on_stream_start(self, segment: Segment) -> None:
        metrics.STREAMS_IN_FLIGHT.inc()
        self._probe = metrics.PacingProbe(segment.pacer)

    def on_chunk_sent(self, segment: Segment, sent: int) -> None:
        if self._probe is not None:
            self._probe.observe(sent)

    def on_stream_end(self, segment: Segment) -> None:
        metrics.STREAMS_IN_FLIGHT.dec()


class ProgressReports(JobHook):
    """`job.progress` events and the Celery PROGRESS state while the audio goes out."""

    def __init__(self, reporter: Reporter) -> None:
        self.reporter = reporter

    def on_chunk_sent(self, segment: Segment, sent: int) -> None:
        # In the source, not the segment: a resumed job's progress goes on from its checkpoint.
        position = segment.start_at + sent / segment.bytes_per_second
        self.reporter.progress_nowait(position, segment.duration)


def worker_hooks(shutting_down: Callable[[], bool], settings: Settings) -> list[HookFactory]:
    """The hooks every job of a worker runs with. The recording comes first: its upload, in
    `on_released`, runs while the lease watch still renews the lease."""
    return [
        recording_hooks(settings),
        LeaseWatch.factory(shutting_down),
        lambda _run: StreamMetrics(),
        lambda run: ProgressReports(run.reporter),
        CaptionCues.of,
    ]
