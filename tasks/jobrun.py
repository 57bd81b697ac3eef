"""One delivery of a job, from the message to its outcome: the `JobRun` state machine.

    run()    ──invalid──────────────────────────────────────────▶ FAILED
       │ └────invalid, another job's id─────────────────────────▶ DROPPED
       ▼
    _claim() ──its room plays another job───────────────────────▶ PARKED
       │ ├────not in its room's order yet, or worker leaving────▶ REQUEUED
       │ ├────done already, or playing elsewhere────────────────▶ DROPPED
       │ └────cancelled while queued────────────────────────────▶ CANCELLED
       ▼
    _play()  ──played (confirmed or not)────────────────────────▶ PLAYED
             ├─no avatar session free (not an attempt)──────────▶ REQUEUED
             ├─cancel request───────────────────────────────────▶ CANCELLED
             ├─worker shutting down─────────────────────────────▶ HANDED_BACK
             ├─taken over by another delivery───────────────────▶ DROPPED
             ├─transient error, attempts left───────────────────▶ RETRY
             ├─transient error, attempts used up────────────────▶ DEAD_LETTERED
             └─permanent error──────────────────────────────────▶ FAILED

A parked job's message is acknowledged: the room's playing job hands it on when it ends, to be
played next in the same worker slot (`Outcome.next`), so a room's jobs run back to back.
An attempt taken over by another delivery ends silently, whatever it was doing.

Each state is a step method, each ending has one handler (`_played`, `_requeued`, …). A run
is given its parts (`JobParts`: ledger, reporter, playback, hooks, shutdown signal) and
reaches for nothing global, so every branch is tested fast with fakes (tests/fakes.py).
Delivery is at-least-once; the ledger makes playback exactly-once and one voice per room, and
records each job's one terminal state (only its first recorder announces it).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Literal, Protocol

from avatarq.budget import Budget
from avatarq.errors import IncompletePlayback, InvalidJob, JobError, Reason, TransientJobError
from avatarq.events import Retrying
from avatarq.jobs import Job, parse_job
from avatarq.ledger.types import Checkpoint, Claim, Handoff, Parked, Progress, Span, job_id_of
from avatarq.results import AttemptSpan, Cancelled, Failed, JobResult, Played, parse_result
from avatarq.settings import Settings
from tasks.backoff import RedisPatience, backoff_delay, outlast_redis
from tasks.context import HookFactory, PlayContext
from tasks.control import Interrupted, JobControl, StopReason
from tasks.link.types import NoAvatarSlot
from tasks.seams import JobLedger, ReporterFactory

log = logging.getLogger("avatarq.jobrun")


class Ending(StrEnum):
    """How a delivery ended; the Celery task (tasks/render.py) acts on it."""

    PLAYED = "played"
    CANCELLED = "cancelled"
    FAILED = "failed"
    DEAD_LETTERED = "dead_lettered"
    #: Published again with a countdown, the attempt counted.
    RETRY = "retry"
    #: Published again, not counted as an attempt (no avatar slot, worker leaving).
    REQUEUED = "requeued"
    #: Kept in its room's lane, the message acknowledged: the room's job hands it on.
    PARKED = "parked"
    #: The worker is shutting down: published again at once for another worker.
    HANDED_BACK = "handed_back"
    #: Nothing to do: ended already, playing elsewhere, or a stray message for another job.
    DROPPED = "dropped"


@dataclass(frozen=True)
class Outcome:
    ending: Ending
    #: The job's end; for DROPPED, the record of a job that had ended already, if any.
    result: JobResult | None = None
    #: For RETRY, REQUEUED and HANDED_BACK: when the message comes back.
    retry_in: float | None = None
    #: The room's next job, handed to this worker to play next (tasks/render.py).
    next: Handoff | None = None


@dataclass(frozen=True)
class Timing:
    """The run's waits, in seconds (the defaults are the product's; tests shorten them)."""

    #: A job that just took its place in its room's order (its place was lost, or it was sent
    #: without `enqueue`) waits this long in its worker slot before going back to the queue.
    room_wait_s: float = 5.0
    room_poll_s: float = 0.2
    room_requeue_s: float = 1.0
    #: A job waiting for an avatar session slot comes back this soon (well within the time its
    #: place in line is kept, tasks/link/quota.py WAITER_STALE_S).
    quota_requeue_s: float = 1.0
    #: How long recording a job's end waits out an unreachable Redis (about five minutes):
    #: a job that gives up goes back to the queue, and its next delivery plays again what
    #: its listener was not recorded to have heard.
    redis: RedisPatience = field(default_factory=lambda: RedisPatience(attempts=120))


class Player(Protocol):
    async def play(self, play: PlayContext) -> Played: ...


@dataclass
class JobParts:
    """What a run is given. A worker process builds one (tasks/render.py); tests build theirs."""

    settings: Settings
    ledger: JobLedger
    reporter: ReporterFactory
    player: Player
    #: True once the worker's shutdown grace is over: playing jobs are handed back.
    shutting_down: Callable[[], bool]
    hooks: Sequence[HookFactory] = ()
    timing: Timing = field(default_factory=Timing)
    #: Called at once with a job handed to this worker (before any other await), so that the
    #: worker's heartbeat keeps holding it (tasks/recovery.py).
    hold: Callable[[Handoff], None] = lambda _handoff: None
    #: Called with a job this delivery parked (task id, job): the worker keeps it in memory
    #: until it ends or plays elsewhere, so it outlives a Redis that lost its data.
    park: Callable[[str, Parked], None] = lambda _task_id, _parked: None


class JobRun:
    """One delivery of one job. `await JobRun(parts, payload, task_id, token).run()`."""

    def __init__(self, parts: JobParts, payload: Any, task_id: str, token: str) -> None:
        self.parts = parts
        self.payload = payload
        self.task_id = task_id
        self.job_id = job_id_of(payload, task_id)
        #: The delivery's lease token: a re-run after a Redis outage is the same holder.
        self.token = token
        self.reporter = parts.reporter(self.job_id)
        self.attempt = 0
        self.control = JobControl()
        self.job: Job | None = None
        #: Where in the source this attempt starts: where earlier ones got to, less overlap.
        self.start_at = 0.0
        self.checkpoint = Checkpoint()
        self.play: PlayContext | None = None

    @property
    def ledger(self) -> JobLedger:
        return self.parts.ledger

    async def run(self) -> Outcome:
        payload = self.payload
        try:
            self.job = parse_job(
                {**payload, "job_id": self.job_id} if isinstance(payload, dict) else payload,
                self.parts.settings,
            )
        except InvalidJob as e:
            if await self.ledger.owned_by_another(self.job_id, payload):
                log.warning("dropping an invalid message for job %s, which is another job's: %s",
                            self.job_id, e)  # fmt: skip
                return self._dropped()
            self.attempt = 1
            return await self._failed(e)
        return await self._claim(self.job)

    async def _claim(self, job: Job) -> Outcome:
        timing = self.parts.timing
        if self.parts.shutting_down():
            # This worker is shutting down, and a broker (RabbitMQ) may still deliver to it: the
            # job goes straight back, unclaimed, so no attempt is spent on a worker that leaves.
            return self._requeued(timing.room_requeue_s)
        deadline = time.monotonic() + timing.room_wait_s
        park = Handoff(self.task_id, self.payload) if self.parts.settings.room_lanes else None
        verdict, attempt = await self.ledger.claim(job.job_id, job.room, self.token, park=park)
        while verdict is Claim.WAIT and time.monotonic() < deadline:
            await asyncio.sleep(timing.room_poll_s)
            verdict, attempt = await self.ledger.claim(job.job_id, job.room, self.token, park=park)
        if verdict is Claim.WAIT:
            return self._requeued(timing.room_requeue_s)
        if verdict is Claim.PARKED:
            log.info("job %s: parked behind its room's playing job", job.job_id)
            self.parts.park(self.task_id, Parked(job.job_id, job.room, self.payload))
            return Outcome(Ending.PARKED)
        if verdict in (Claim.DONE, Claim.BUSY):
            log.info("job %s: %s, not playing it", job.job_id, verdict.value)
            if verdict is Claim.DONE:
                return await self._ended_already(job.job_id)
            return self._dropped()
        if verdict is Claim.CANCELLED:
            return await self._cancelled(while_="queued", position=None, streamed=0.0)
        self.attempt = attempt
        if job.resume == "checkpoint":
            self.checkpoint = await self.ledger.checkpoint(job.job_id)
            overlap = self.parts.settings.resume_overlap_s
            self.start_at = max(0.0, self.checkpoint.heard - overlap)
        return await self._play(job)

    async def _play(self, job: Job) -> Outcome:
        play = self.play = PlayContext(
            job,
            Budget.of(job, self.parts.settings),
            self.token,
            self.control,
            self.ledger,
            self.reporter,
            attempt=self.attempt,
            start_at=self.start_at,
        )
        play.hooks = hooks = [make(play) for make in self.parts.hooks]
        for hook in hooks:
            await hook.on_claimed()
        try:
            outcome: Played | Exception = await self.parts.player.play(play)
        except Exception as e:  # each is an ending, handled once the hooks let go
            outcome = e
        finally:
            # Before any ending: a release or a record must come after the lease watch's last
            # tick, and the watch may still record where the attempt got.
            for hook in hooks:
                await hook.on_released()
        return await self._ended_play(job, outcome)

    async def _ended_play(self, job: Job, outcome: Played | Exception) -> Outcome:
        if isinstance(outcome, Played):
            return await self._played(outcome)
        if isinstance(outcome, NoAvatarSlot):
            log.info("job %s: %s; requeued", job.job_id, outcome)
            return await self._waiting_for_avatar()
        if isinstance(outcome, Interrupted):
            if outcome.reason is StopReason.HANDED_BACK:
                if self.control.taken_over:
                    return self._dropped()
                return await self._handed_back(outcome.playback_position)
            return await self._cancelled(
                while_="playing",
                position=outcome.playback_position,
                streamed=outcome.seconds_streamed,
                stopped_at=outcome.stopped_at,
            )
        if isinstance(outcome, TimeoutError):
            return await self._error(
                TransientJobError(
                    "job overran its time limit (audio length plus start-up budget)",
                    reason=Reason.JOB_TIMEOUT,
                )
            )
        if isinstance(outcome, JobError):
            return await self._error(outcome)
        # Unclassified: keep the trace in the log, retry like any fault we cannot rule out.
        log.error("job %s: unexpected error", job.job_id, exc_info=outcome)
        error = TransientJobError(
            f"{type(outcome).__name__}: {outcome}", reason=Reason.INTERNAL_ERROR
        )
        return await self._error(error)

    # -- one handler per ending -------------------------------------------------------------

    async def _played(self, played: Played) -> Outcome:
        end = played.ended_at if played.ended_at is not None else played.started_at
        spans = (*self.checkpoint.spans, Span(self.attempt, played.started_at, end))
        spans = tuple(s for s in spans if s.attempt < self.attempt) + spans[-1:]
        update = {
            "attempts": [AttemptSpan(**vars(s)) for s in spans],
            "seconds_heard_twice": round(Checkpoint(spans=spans).heard_twice_s, 3),
        }
        return await self._end(Ending.PLAYED, played.model_copy(update=update))

    def _dropped(self) -> Outcome:
        return Outcome(Ending.DROPPED)

    async def _ended_already(self, job_id: str) -> Outcome:
        """A late copy of a job that ended (a redelivery, or the message of a job its room's
        lane took from the ledger first): its result again, for Celery's state, which this
        delivery's start overwrote."""
        record = await self.ledger.record(job_id)
        return Outcome(Ending.DROPPED, parse_result(record) if record is not None else None)

    def _requeued(self, retry_in: float) -> Outcome:
        return Outcome(Ending.REQUEUED, retry_in=retry_in)

    async def _release(self, *, uncount: bool = False) -> bool:
        """Give the job back; False when another delivery took it over meanwhile."""
        job = self._job
        if await self.ledger.release(job.job_id, job.room, self.token, uncount=uncount):
            return True
        log.warning("job %s: taken over by another delivery; this attempt ends silently",
                    job.job_id)  # fmt: skip
        return False

    async def _waiting_for_avatar(self) -> Outcome:
        # Waiting is not failing: back to the queue, this claim not counted as an attempt.
        if not await self._release(uncount=True):
            return self._dropped()
        return self._requeued(self.parts.timing.quota_requeue_s)

    async def _handed_back(self, position: float | None) -> Outcome:
        if position is not None:
            # The avatar reported where it stopped, its buffer cleared: resume exactly there.
            job, heard = self._job, self.start_at + position
            progress = Progress(self.attempt, self.start_at, heard, heard)
            await self.ledger.watch(job.job_id, job.room, self.token, progress)
        if not await self._release():
            return self._dropped()
        reason = StopReason.HANDED_BACK.value
        await self.reporter.emit(Retrying(reason=reason, attempt=self.attempt, retry_in=0))
        return Outcome(Ending.HANDED_BACK, retry_in=0.0)

    async def _cancelled(
        self,
        *,
        while_: Literal["queued", "playing"],
        position: float | None,
        streamed: float,
        stopped_at: float | None = None,
    ) -> Outcome:
        job = self._job
        cancelled = Cancelled(
            job_id=job.job_id,
            attempt=self.attempt,
            room=job.room,
            avatar_id=job.avatar_id,
            metadata=job.metadata,
            cancelled_while=while_,
            seconds_streamed=round(streamed, 6),
            playback_position=position,
            stopped_at=stopped_at,
        )
        return await self._end(Ending.CANCELLED, cancelled)

    async def _error(self, error: JobError) -> Outcome:
        """A play that failed: retry a transient fault while attempts are left."""
        settings = self.parts.settings
        if not error.permanent and self.attempt <= settings.max_retries:
            return await self._retry(error)
        return await self._failed(error)

    async def _retry(self, error: JobError) -> Outcome:
        job, settings = self._job, self.parts.settings
        countdown = backoff_delay(self.attempt - 1, settings.retry_base_s, settings.retry_cap_s)
        if isinstance(error, IncompletePlayback):
            # The avatar said how much it played: the retry resumes exactly there.
            heard = self.start_at + error.heard_s
            progress = Progress(self.attempt, self.start_at, heard, heard)
            await self.ledger.watch(job.job_id, job.room, self.token, progress)
        if not await self._release():
            return self._dropped()
        log.warning("job %s attempt %d: %s; retry in %.1fs",
                    job.job_id, self.attempt, error, countdown)  # fmt: skip
        await self.reporter.emit(
            Retrying(
                reason=error.reason,
                error=error.message,
                attempt=self.attempt,
                retry_in=round(countdown, 3),
            )
        )
        return Outcome(Ending.RETRY, retry_in=countdown)

    async def _failed(self, error: JobError) -> Outcome:
        job = self.job
        where: dict[str, Any] = {}
        if job is not None:
            where = {"room": job.room, "avatar_id": job.avatar_id, "metadata": job.metadata}
        failed = Failed(
            job_id=self.job_id,
            attempt=self.attempt,
            reason=error.reason,
            error=error.message,
            **where,
        )
        if job is not None and not error.permanent:
            # Retries used up: keep the job where an operator can see and replay it.
            return await self._end(Ending.DEAD_LETTERED, failed, dead_letter=job.payload())
        return await self._end(Ending.FAILED, failed)

    # -- the one way a job ends -------------------------------------------------------------

    async def _end(
        self, ending: Ending, result: JobResult, *, dead_letter: dict[str, Any] | None = None
    ) -> Outcome:
        """Record the terminal state once; only the first recorder announces it, and an
        attempt that was taken over records nothing."""
        if self.play is not None and self.play.recording is not None:
            result = result.model_copy(update={"recording": self.play.recording})
        record = result.as_record()
        room = self.job.room if self.job else None
        webhook = str(self.job.webhook_url) if self.job and self.job.webhook_url else None
        # The job has ended; losing its record would let it play again.
        finish = await outlast_redis(
            lambda: self.ledger.finish(
                self.job_id,
                room,
                record,
                token=self.token,
                hand_on=self.parts.settings.room_lanes,
                webhook=webhook,
            ),
            doing=f"recording the end of job {self.job_id}",
            patience=self.parts.timing.redis,
        )
        if finish.next is not None:
            self.parts.hold(finish.next)
        if not finish.recorded:
            return Outcome(Ending.DROPPED, next=finish.next)
        if dead_letter is not None:
            await self.ledger.dead_letter(dead_letter, record)
        await self.reporter.announce(result, webhook)
        return Outcome(ending, result, next=finish.next)

    @property
    def _job(self) -> Job:
        assert self.job is not None, "only a parsed job gets this far"
        return self.job
