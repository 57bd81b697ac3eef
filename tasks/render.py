"""The render task: Celery's side of a job. The job itself runs in tasks/pipeline.py.

Delivery is at-least-once (acks_late, reject_on_worker_lost); tasks/ledger.py turns that into
exactly-once playback and one voice per room. Every job ends in exactly one terminal state,
`completed`, `failed` or `cancelled`, recorded once and announced once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from typing import Any, Literal

import redis.asyncio as aioredis
from celery import Task
from celery.exceptions import Ignore
from celery.signals import task_received, worker_ready
from redis.exceptions import RedisError

from avatarq.celeryconfig import RENDER_QUEUE, RENDER_TASK
from avatarq.errors import InvalidJob, JobError, Reason, TransientJobError
from avatarq.events import Event, Status
from avatarq.ledger.keys import job_enqueued_key
from avatarq.ledger.worker import Claim, Ledger
from avatarq.results import Cancelled, Failed
from avatarq.settings import Settings, get_settings
from producers.jobs import Job, parse_job
from tasks import pipeline
from tasks.app import app
from tasks.backoff import backoff_delay
from tasks.control import HAND_BACK, Interrupted, JobControl, StopReason
from tasks.quota import NoAvatarSlot
from tasks.recovery import get_presence
from tasks.report import JobReporter, StateUpdater
from tasks.runtime import get_loop_thread

log = logging.getLogger("avatarq.render")

#: A job whose room is busy waits this long in its worker slot before going back to the
#: queue, so waiting jobs can never fill every slot while the room's head job is queued.
ROOM_WAIT_S = 5.0
ROOM_POLL_S = 0.2
ROOM_REQUEUE_S = 1.0
#: A job waiting for an avatar session slot comes back this soon (well within the time its
#: place in line is kept, tasks/quota.py WAITER_STALE_S).
QUOTA_REQUEUE_S = 1.0
#: How often a playing job checks for cancel and hand-back: stops within half a second.
WATCH_INTERVAL_S = 0.25
#: Tries to record a job's end, or to start one, while Redis is unreachable (about a minute
#: with backoff).
FINISH_ATTEMPTS = 20
REDIS_OUTAGE_ATTEMPTS = 20


class JobFailed(Exception):
    """Raised to Celery after a job failed for good; its record holds the details."""


@dataclass(frozen=True)
class Outcome:
    """What the task does once the job's coroutine returns: finish, retry later, or drop."""

    result: dict[str, Any] | None = None
    retry_in: float | None = None


SKIP = Outcome()


# max_retries=None: Celery must never give up on its own (its default is 3): requeues while a
# room is busy are not attempts, and real attempts are bounded by the ledger's counter.
@app.task(name=RENDER_TASK, bind=True, acks_late=True, reject_on_worker_lost=True, max_retries=None)
def render(self: Task, payload: dict[str, Any]) -> dict[str, Any]:
    """Play one job through its avatar in its LiveKit room and return the result.

    ``payload`` is a `producers.jobs.Job` as JSON; it is validated again here because any
    producer, in any language, may have sent it. Bad input fails at once and for good;
    transient faults (network, 5xx, timeouts) are retried up to `AVATARQ_MAX_RETRIES` times
    with exponential backoff and jitter, each attempt playing the job from the start.
    """
    settings = get_settings()
    task_id = self.request.id
    presence = get_presence(settings, republish)

    def update_state(meta: dict[str, Any]) -> None:
        self.update_state(task_id=task_id, state="PROGRESS", meta=meta)

    # One lease token per delivery: a re-run after a Redis outage is the same holder.
    token = presence.new_token()
    try:
        for outage in range(REDIS_OUTAGE_ATTEMPTS):
            try:
                outcome = get_loop_thread().run(
                    run_job(payload, task_id, token, settings, update_state)
                )
                break
            except (RedisError, OSError) as e:
                # Redis (broker and ledger) is unreachable before the job could start: wait
                # it out here rather than fail, since failing would acknowledge, and lose, it.
                log.warning("job %s: Redis unreachable (%s); trying again", task_id, e)
                time.sleep(backoff_delay(outage, 0.5, 5.0))
        else:
            raise TransientJobError("Redis unreachable: the job could not start")
        if outcome.retry_in is not None:
            # Published again (with its countdown) before this delivery lets go of it.
            raise self.retry(countdown=outcome.retry_in)
    finally:
        presence.let_go(task_id)
    if outcome.result is None:
        raise Ignore()  # ended already, or a duplicate delivery of a job playing elsewhere
    if outcome.result["status"] == Status.FAILED:
        raise JobFailed(f"{outcome.result['reason']}: {outcome.result['error']}")
    return outcome.result


@worker_ready.connect
def _announce(**_: Any) -> None:
    # Heartbeat and sweeper from the start: an idle worker recovers dead workers' jobs too.
    get_presence(get_settings(), republish)


@task_received.connect
def _hold_on_receipt(sender: Any, request: Any, **_: Any) -> None:
    # From receipt, not from the start of the run: a countdown retry waits unacknowledged in
    # this process first, and must be recovered too if the process dies meanwhile. Keyed by
    # task id: an invalid message naming another job's id must not stand in for that job.
    # A prefork parent never learns when its children finish a job (see get_presence).
    if request.name != RENDER_TASK or _is_prefork(sender):
        return
    payload = request.args[0] if request.args else None
    if isinstance(payload, dict):
        payload = {**payload, "job_id": job_id_of(payload, request.id)}
    get_presence(get_settings(), republish).hold(request.id, payload)


def _is_prefork(consumer: Any) -> bool:
    return type(getattr(consumer, "pool", None)).__module__ == "celery.concurrency.prefork"


def republish(task_id: str, payload: Any) -> None:
    """Send a dead worker's delivery again (tasks/recovery.py), under its own task id."""
    app.send_task(RENDER_TASK, args=[payload], task_id=task_id, queue=RENDER_QUEUE)


def job_id_of(payload: Any, task_id: str) -> str:
    """The job's id: its own, else the Celery task id, which every redelivery and retry of
    the message keeps (a fresh random id per delivery would never reach its room's head)."""
    if isinstance(payload, dict) and isinstance(payload.get("job_id"), str) and payload["job_id"]:
        return str(payload["job_id"])
    return task_id


async def run_job(
    payload: Any,
    task_id: str,
    token: str,
    settings: Settings,
    update_state: StateUpdater | None,
) -> Outcome:
    redis = aioredis.from_url(settings.redis_url)
    ledger = Ledger(redis, stale_after_s=settings.redelivery_after_s)
    job_id = job_id_of(payload, task_id)
    reporter = JobReporter(settings, job_id, update_state=update_state, redis=redis)
    try:
        try:
            job = parse_job({**payload, "job_id": job_id} if isinstance(payload, dict) else payload)
        except InvalidJob as e:
            if await _owned_by_another(redis, job_id, payload):
                log.warning("dropping an invalid message for job %s, which is another job's: %s",
                            job_id, e)  # fmt: skip
                return SKIP
            return await _end(ledger, reporter, None, _failure(job_id, None, e, attempt=1))
        return await _claim_and_play(job, token, settings, ledger, reporter)
    finally:
        await redis.aclose()


async def _owned_by_another(redis: aioredis.Redis, job_id: str, payload: Any) -> bool:
    """Whether a valid job owns this id (enqueued with another payload, or claimed by a valid
    delivery): a message that fails validation must not end a job it does not own."""
    registered = await redis.hget(job_enqueued_key(job_id), "job")  # type: ignore[misc]
    if registered is not None:
        return bool(json.loads(registered) != payload)
    return bool(await redis.exists(job_enqueued_key(job_id)))


async def _claim_and_play(
    job: Job, token: str, settings: Settings, ledger: Ledger, reporter: JobReporter
) -> Outcome:
    if HAND_BACK.is_set():
        # This worker is shutting down, and a broker (RabbitMQ) may still deliver to it: the
        # job goes straight back, unclaimed, so no attempt is spent on a worker that leaves.
        return Outcome(retry_in=ROOM_REQUEUE_S)
    deadline = time.monotonic() + ROOM_WAIT_S
    verdict, attempt = await ledger.claim(job.job_id, job.room, token)
    while verdict is Claim.WAIT and time.monotonic() < deadline:
        await asyncio.sleep(ROOM_POLL_S)
        verdict, attempt = await ledger.claim(job.job_id, job.room, token)
    if verdict is Claim.WAIT:
        return Outcome(retry_in=ROOM_REQUEUE_S)
    if verdict in (Claim.DONE, Claim.BUSY):
        log.info("job %s: %s, not playing it", job.job_id, verdict.value)
        return SKIP
    if verdict is Claim.CANCELLED:
        result = _cancelled(job, attempt=0, while_="queued", position=None, streamed=0.0)
        return await _end(ledger, reporter, job, result)

    control = JobControl()
    watcher = asyncio.create_task(_watch(ledger, job, token, control))
    try:
        result = await pipeline.play(
            job,
            settings,
            reporter,
            control,
            attempt=attempt,
            note_session=ledger.note_avatar_session,
        )
    except NoAvatarSlot as e:
        # Waiting is not failing: back to the queue, this claim not counted as an attempt.
        log.info("job %s: %s; requeued", job.job_id, e)
        await ledger.release(job.job_id, job.room, token, uncount=True)
        return Outcome(retry_in=QUOTA_REQUEUE_S)
    except Interrupted as e:
        if e.reason is StopReason.HANDED_BACK and watcher.done() and watcher.result():
            return SKIP  # another delivery plays it now
        if e.reason is StopReason.HANDED_BACK:
            await ledger.release(job.job_id, job.room, token)
            await reporter.emit(Event.RETRYING, reason=e.reason.value, attempt=attempt, retry_in=0)
            return Outcome(retry_in=0.0)
        result = _cancelled(
            job,
            attempt=attempt,
            while_="playing",
            position=e.playback_position,
            streamed=e.seconds_streamed,
            stopped_at=e.stopped_at,
        )
    except TimeoutError:
        error = TransientJobError(
            "job overran its time limit (audio length plus start-up budget)",
            reason=Reason.JOB_TIMEOUT,
        )
        return await _failed(job, settings, ledger, reporter, token, error, attempt)
    except JobError as e:
        return await _failed(job, settings, ledger, reporter, token, e, attempt)
    except Exception as e:
        # Unclassified: keep the trace in the log, retry like any fault we cannot rule out.
        log.exception("job %s: unexpected error", job.job_id)
        error = TransientJobError(f"{type(e).__name__}: {e}", reason=Reason.INTERNAL_ERROR)
        return await _failed(job, settings, ledger, reporter, token, error, attempt)
    finally:
        watcher.cancel()
    return await _end(ledger, reporter, job, result)


async def _watch(ledger: Ledger, job: Job, token: str, control: JobControl) -> bool:
    """Every tick: renew (or restore) the job's lease and its hold on the room; stop the job
    on a cancel request, at the end of shutdown grace, or when another delivery took it over
    (this worker was taken for dead). Returns True in that last case."""
    while control.reason is None:
        await asyncio.sleep(WATCH_INTERVAL_S)
        if HAND_BACK.is_set():
            control.request_stop(StopReason.HANDED_BACK)
            return False
        try:
            cancel, ours = await ledger.watch(job.job_id, job.room, token)
        except (RedisError, OSError) as e:
            # Keep playing through a Redis outage; the lease outlives a short one.
            log.warning("job %s: ledger unreachable: %s", job.job_id, e)
            continue
        if cancel:
            control.request_stop(StopReason.CANCELLED)
        elif not ours:
            log.warning("job %s: its lease was taken over by another delivery; stopping",
                        job.job_id)  # fmt: skip
            control.request_stop(StopReason.HANDED_BACK)
            return True
    return False


async def _failed(
    job: Job,
    settings: Settings,
    ledger: Ledger,
    reporter: JobReporter,
    token: str,
    error: JobError,
    attempt: int,
) -> Outcome:
    if not error.permanent and attempt <= settings.max_retries:
        countdown = backoff_delay(attempt - 1, settings.retry_base_s, settings.retry_cap_s)
        log.warning("job %s attempt %d: %s; retry in %.1fs", job.job_id, attempt, error, countdown)
        await ledger.release(job.job_id, job.room, token)
        await reporter.emit(
            Event.RETRYING,
            reason=error.reason,
            error=error.message,
            attempt=attempt,
            retry_in=round(countdown, 3),
        )
        return Outcome(retry_in=countdown)
    result = _failure(job.job_id, job, error, attempt=attempt)
    if not error.permanent:
        # Retries exhausted: keep the job where an operator can see and replay it.
        await ledger.dead_letter(job.payload(), result)
    return await _end(ledger, reporter, job, result)


async def _end(
    ledger: Ledger, reporter: JobReporter, job: Job | None, result: dict[str, Any]
) -> Outcome:
    """Record the terminal state once; only the first recorder announces it."""
    room = job.room if job else None
    for attempt in range(FINISH_ATTEMPTS):
        try:
            recorded = await ledger.finish(result["job_id"], room, result)
            break
        except RedisError as e:
            # The job has ended; losing its record would let it play again. Wait Redis out.
            log.warning("job %s: cannot record its end yet: %s", result["job_id"], e)
            await asyncio.sleep(backoff_delay(attempt, 0.5, 5.0))
    else:
        raise TransientJobError("could not record the job's end: Redis unreachable")
    if not recorded:
        return SKIP
    webhook = str(job.webhook_url) if job is not None and job.webhook_url else None
    await reporter.announce(result, webhook)
    return Outcome(result=result)


def _failure(job_id: str, job: Job | None, error: JobError, *, attempt: int) -> dict[str, Any]:
    where = {"room": job.room, "avatar_id": job.avatar_id, "metadata": job.metadata} if job else {}
    failed = Failed(
        job_id=job_id, attempt=attempt, reason=error.reason, error=error.message, **where
    )
    return failed.as_record()


def _cancelled(
    job: Job,
    *,
    attempt: int,
    while_: Literal["queued", "playing"],
    position: float | None,
    streamed: float,
    stopped_at: float | None = None,
) -> dict[str, Any]:
    return Cancelled(
        job_id=job.job_id,
        attempt=attempt,
        room=job.room,
        avatar_id=job.avatar_id,
        metadata=job.metadata,
        cancelled_while=while_,
        seconds_streamed=round(streamed, 6),
        playback_position=position,
        stopped_at=stopped_at,
    ).as_record()
