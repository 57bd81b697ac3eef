"""The render task: Celery's side of a job, and the parts a worker process gives its runs.

Delivery is at-least-once (acks_late, reject_on_worker_lost). The job itself is a `JobRun`
(tasks/jobrun.py): it ends in exactly one terminal state, recorded once and announced once,
or goes back to the queue; this module turns its `Outcome` into Celery's terms.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

from celery import Task, states
from celery.exceptions import Ignore
from celery.signals import (
    task_received,
    worker_process_shutdown,
    worker_ready,
    worker_shutdown,
    worker_shutting_down,
)
from redis.exceptions import RedisError

from avatarq import logs, redisclient
from avatarq.celeryconfig import RENDER_QUEUE, RENDER_TASK, broker_countdown
from avatarq.ledger.types import Handoff, job_id_of
from avatarq.ledger.worker import Ledger
from avatarq.results import Failed
from avatarq.settings import Settings, get_settings
from tasks.app import app
from tasks.audio import FfmpegAudio
from tasks.backoff import RedisPatience, RedisUnreachable, outlast_redis
from tasks.brokerqueue import oldest_task_ids
from tasks.control import HAND_BACK, LEAVING
from tasks.hooks import worker_hooks
from tasks.jobrun import Ending, JobParts, JobRun, Outcome
from tasks.link.links import Links
from tasks.playback import Playback
from tasks.recovery import Presence, get_presence
from tasks.report import JobReporter, StateUpdater
from tasks.runtime import get_loop_thread

log = logging.getLogger("avatarq.render")

#: A job whose run gave up waiting for Redis comes back through the broker this soon.
REDIS_REQUEUE_S = 5.0
#: A room's lane plays at most this many jobs in one worker slot before handing the rest
#: back to the broker, so one busy room cannot hold a slot for ever.
LANE_MAX_JOBS = 100


class JobFailed(Exception):
    """Raised to Celery after a job failed for good; its record holds the details."""


# max_retries=None: Celery must never give up on its own (its default is 3): requeues while a
# room is busy are not attempts, and real attempts are bounded by the ledger's counter.
@app.task(name=RENDER_TASK, bind=True, acks_late=True, reject_on_worker_lost=True, max_retries=None)
def render(self: Task, payload: dict[str, Any]) -> dict[str, Any]:
    """Play one job through its avatar in its LiveKit room and return the result; then the
    room's next jobs, as the ledger hands them on (the room's lane).

    ``payload`` is a `avatarq.jobs.Job` as JSON; it is validated again here because any
    producer, in any language, may have sent it. Bad input fails at once and for good;
    transient faults (network, 5xx, timeouts) are retried up to `AVATARQ_MAX_RETRIES` times
    with exponential backoff and jitter.
    """
    settings = get_settings()
    task_id = self.request.id
    presence = _presence(settings)
    _mark_started(self, task_id)
    try:
        outcome = _deliver(self, payload, task_id, settings)
        if outcome.retry_in is not None:
            # Published again (with its countdown) before this delivery lets go of it, and
            # followed until another delivery has it.
            countdown = broker_countdown(outcome.retry_in)
            presence.sent_back(task_id, payload, countdown)
            raise self.retry(countdown=countdown)
    finally:
        presence.let_go(task_id)
    if outcome.result is not None:
        # Stored now, not when the lane below is over: its caller may be waiting for it.
        _store(self, task_id, outcome)
    handoff = outcome.next
    for _ in range(LANE_MAX_JOBS):
        if handoff is None:
            break
        handoff = _play_handed(self, handoff, settings)
    else:
        if handoff is not None:  # a long lane: the rest goes through the broker again
            _hand_on(presence, handoff)
            presence.let_go(handoff.task_id)
    if outcome.ending in (Ending.DROPPED, Ending.PARKED) or outcome.result is None:
        raise Ignore()  # ended already, a duplicate, or kept in its room's lane
    if isinstance(outcome.result, Failed):
        raise JobFailed(f"{outcome.result.reason}: {outcome.result.error}")
    return outcome.result.as_record()


def _mark_started(task: Task, task_id: str) -> None:
    """Celery's STARTED state, as `task_track_started` would store it, but best effort: the
    run itself waits out an unreachable Redis, and sends the job back if it must."""
    try:
        task.update_state(
            task_id=task_id,
            state=states.STARTED,
            meta={"pid": os.getpid(), "hostname": task.request.hostname},
        )
    except Exception as e:  # noqa: BLE001 - the backend's own errors, after its retries
        log.warning("job %s: Celery's STARTED state not stored: %s", task_id, e)


def _deliver(task: Task, payload: Any, task_id: str, settings: Settings) -> Outcome:
    """One delivery of one job, waiting out a Redis outage before it could start."""

    def update_state(meta: dict[str, Any]) -> None:
        task.update_state(task_id=task_id, state="PROGRESS", meta=meta)

    # One lease token per delivery: a re-run after a Redis outage is the same holder.
    token = _presence(settings).new_token()
    # Redis (broker and ledger) unreachable before the job could start: wait it out rather
    # than fail, since failing would acknowledge, and lose, it.
    run = outlast_redis(
        lambda: run_job(payload, task_id, token, settings, update_state),
        doing=f"starting job {task_id}",
        patience=RedisPatience(),
        errors=(RedisError, OSError),
    )
    try:
        return get_loop_thread().run(run)
    except RedisUnreachable as e:
        # Past the patience, before the job could start or record its end: back to the
        # queue (a job that played resumes from where its listener was last recorded).
        log.warning("job %s: %s; sending it back to the queue", task_id, e)
        return Outcome(Ending.REQUEUED, retry_in=REDIS_REQUEUE_S)


def _play_handed(task: Task, handoff: Handoff, settings: Settings) -> Handoff | None:
    """Play a job its room's previous job handed to this process (its message was
    acknowledged when it parked: this process holds it, tasks/recovery.py); returns the
    room's next one."""
    presence = _presence(settings)
    if LEAVING.is_set():
        _hand_on(presence, handoff)
        presence.let_go(handoff.task_id)
        return None
    logs.bind_payload(handoff.payload, handoff.task_id)
    try:
        outcome = _deliver(task, handoff.payload, handoff.task_id, settings)
        if outcome.retry_in is not None:
            _hand_on(presence, handoff, retry_in=outcome.retry_in)
        elif outcome.result is not None:
            _store(task, handoff.task_id, outcome)
    except BaseException:
        _hand_on(presence, handoff)
        raise
    finally:
        presence.let_go(handoff.task_id)
    return outcome.next


def _store(task: Task, task_id: str, outcome: Outcome) -> None:
    """The job's Celery result, for a caller waiting on its task id."""
    assert outcome.result is not None
    if isinstance(outcome.result, Failed):
        error = JobFailed(f"{outcome.result.reason}: {outcome.result.error}")
        task.backend.mark_as_failure(task_id, error)
    else:
        task.backend.mark_as_done(task_id, outcome.result.as_record())


def _hand_on(presence: Presence, handoff: Handoff, retry_in: float = 0.0) -> None:
    """Send a job this process holds back through the broker, followed until received."""
    countdown = broker_countdown(retry_in)
    app.send_task(
        RENDER_TASK,
        args=[handoff.payload],
        task_id=handoff.task_id,
        queue=RENDER_QUEUE,
        countdown=countdown or None,
    )
    presence.sent_back(handoff.task_id, handoff.payload, countdown)


@worker_ready.connect
def _announce(**_: Any) -> None:
    # Heartbeat and sweeper from the start: an idle worker recovers dead workers' jobs too.
    _presence(get_settings())


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
    _presence(get_settings()).hold(request.id, payload)


def _is_prefork(consumer: Any) -> bool:
    return type(getattr(consumer, "pool", None)).__module__ == "celery.concurrency.prefork"


def republish(task_id: str, payload: Any) -> None:
    """Send a dead worker's delivery again (tasks/recovery.py), under its own task id."""
    app.send_task(RENDER_TASK, args=[payload], task_id=task_id, queue=RENDER_QUEUE)


def _oldest_queued() -> list[str] | None:
    return oldest_task_ids(app, RENDER_QUEUE)


def _presence(settings: Settings) -> Presence:
    """This process's presence in Redis (tasks/recovery.py)."""
    return get_presence(settings, republish, _oldest_queued)


class WorkerParts:
    """The parts every job of this worker process shares: one Redis client, the ledger, the
    warm pool and quotas (tasks/link/links.py), the playback steps. Built on the process's event
    loop (tasks/runtime.py), on first use."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.redis = redisclient.async_client(settings.redis_url)
        self.ledger = Ledger(self.redis, stale_after_s=settings.redelivery_after_s)
        self.links = Links(settings, self.redis)
        self.playback = Playback(settings, audio=FfmpegAudio(settings), links=self.links)
        self.webhooks = _presence(settings).webhooks

    def for_delivery(self, update_state: StateUpdater | None) -> JobParts:
        def reporter(job_id: str) -> JobReporter:
            return JobReporter(
                self.settings,
                job_id,
                update_state=update_state,
                outbox=self.webhooks,
                redis=self.redis,
            )

        return JobParts(
            settings=self.settings,
            ledger=self.ledger,
            reporter=reporter,
            player=self.playback,
            shutting_down=HAND_BACK.is_set,
            hooks=worker_hooks(HAND_BACK.is_set, self.settings),
            hold=lambda handoff: _presence(self.settings).hold(handoff.task_id, handoff.payload),
            park=_presence(self.settings).park,
        )


_worker: WorkerParts | None = None


def worker_parts(settings: Settings) -> WorkerParts:
    """This process's parts (one event loop per worker process, see tasks/runtime.py)."""
    global _worker
    if _worker is None:
        _worker = WorkerParts(settings)
    return _worker


async def run_job(
    payload: Any,
    task_id: str,
    token: str,
    settings: Settings,
    update_state: StateUpdater | None,
) -> Outcome:
    parts = worker_parts(settings).for_delivery(update_state)
    return await JobRun(parts, payload, task_id, token).run()


@worker_shutting_down.connect
def _hand_back_after_grace(**_: Any) -> None:
    # Warm shutdown: Celery stops taking jobs and waits for the playing ones. Let them finish
    # within the grace period; then hand the rest back so another worker plays them.
    LEAVING.set()
    _presence(get_settings()).hand_back_parked()
    timer = threading.Timer(get_settings().shutdown_grace_s, HAND_BACK.set)
    timer.daemon = True
    timer.start()
    # No new job will come to reuse them: let idle avatars go now.
    if _worker is not None:
        get_loop_thread().submit(_worker.links.aclose())


#: How long a worker process's exit waits for its idle avatars to stop.
CLOSE_LINKS_S = 10.0
#: How long it then waits for the webhooks still going out (one takes at most about 45 s:
#: four attempts of 10 s and their backoff).
SEND_WEBHOOKS_S = 60.0


@worker_shutdown.connect
@worker_process_shutdown.connect
def _close_links_before_exit(**_: Any) -> None:
    # Links parked during the grace period, and a prefork child's (only its parent hears of
    # a warm shutdown): their avatars stop and their session slots come back before the
    # process exits, not when the slots' leases run out.
    if _worker is None:
        return
    try:
        get_loop_thread().run(_worker.links.aclose(), timeout=CLOSE_LINKS_S)
    except Exception as e:  # exiting either way: the leases run out
        log.warning("idle avatars not stopped at exit: %r", e)
    try:
        get_loop_thread().run(_worker.webhooks.aclose(), timeout=SEND_WEBHOOKS_S)
    except Exception as e:
        log.warning("webhooks still going out at exit are lost: %r", e)
