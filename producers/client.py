"""The producer's API: enqueue jobs, follow them, cancel them.

Sends by task name (`send_task`), so producers never import the worker (no LiveKit, no
ffmpeg here).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import redis
from celery import Celery
from celery.result import AsyncResult

from avatarq import redisclient
from avatarq.celeryconfig import RENDER_QUEUE, RENDER_TASK, celery_config
from avatarq.errors import Reason
from avatarq.events import TERMINAL, Status
from avatarq.jobs import Job, parse_job
from avatarq.ledger.producer import ProducerLedger
from avatarq.settings import Settings, get_settings
from avatarq.sourcepolicy import check_source_url, check_url, webhook_policy
from producers.tts.render import render_job

#: Seconds of slack on top of a job's own length before Celery's hard time limit fires
#: (prefork pools only; the threads pool relies on the pipeline's own deadline).
TIME_LIMIT_SLACK_S = 300


@lru_cache(maxsize=4)
def _celery(config: str) -> Celery:
    app = Celery("avatarq-producer")
    app.conf.update(json.loads(config))
    return app


def celery_app(settings: Settings | None = None) -> Celery:
    """The Celery app of the deployment `settings` name, built from those settings alone
    (one app per distinct configuration: a Celery app connects lazily and is reused)."""
    config = celery_config(settings or get_settings())
    return _celery(json.dumps(config, sort_keys=True))


@dataclass(frozen=True)
class JobHandle:
    job_id: str
    result: AsyncResult
    #: False when this job id had been enqueued before: nothing new was sent.
    created: bool = True

    def wait(self, timeout: float | None = None) -> dict[str, Any]:
        """Block until the job ends; returns its result (raises if it failed)."""
        return self.result.get(timeout=timeout, propagate=True)  # type: ignore[no-any-return]


#: Which Job field a job error raised while preparing a job is about, by its reason.
FIELD_OF_REASON: dict[str, str] = {
    Reason.SOURCE_NOT_ALLOWED: "source",
    Reason.WEBHOOK_NOT_ALLOWED: "webhook_url",
    Reason.TTS_REJECTED: "source",
    Reason.TTS_UNAVAILABLE: "source",
}


def prepare(job: Job | Mapping[str, Any], *, settings: Settings | None = None) -> Job:
    """The job as it is sent: validated, its `tts` source rendered to stored audio, its URLs
    checked against the SSRF policy. Raises `InvalidJob`, or the TTS engine's `JobError`."""
    s = settings or get_settings()
    parsed = render_job(parse_job(dict(job) if isinstance(job, Mapping) else job, s), s)
    if isinstance(parsed.source, str):
        check_source_url(parsed.source, s, resolve=False)
    if parsed.webhook_url is not None:
        check_url(str(parsed.webhook_url), webhook_policy(s), resolve=False)
    return parsed


def enqueue(job: Job | Mapping[str, Any], *, settings: Settings | None = None) -> JobHandle:
    """Prepare (`prepare`) and enqueue one job; the job id is also the Celery task id.

    Idempotent: a job id that was enqueued before is not sent again (`created` is False).
    The job takes its place in its room's order here, so jobs of one room play in the order
    they were enqueued.
    """
    s = settings or get_settings()
    parsed = prepare(job, settings=s)
    app = celery_app(s)
    payload = parsed.payload()
    ledger = ledger_for(s)
    if not ledger.register(parsed.job_id, parsed.room, payload):
        return JobHandle(parsed.job_id, AsyncResult(parsed.job_id, app=app), created=False)
    limit = (parsed.max_duration or s.max_job_duration_s) + TIME_LIMIT_SLACK_S
    try:
        res = app.send_task(
            RENDER_TASK,
            args=[payload],
            task_id=parsed.job_id,
            queue=RENDER_QUEUE,
            time_limit=limit,
            soft_time_limit=limit - 30,
        )
    except Exception:
        # Not sent: free the id and the room's place so a retry of this call can succeed.
        ledger.unregister(parsed.job_id, parsed.room)
        raise
    return JobHandle(parsed.job_id, res)


def enqueue_many(
    jobs: Iterable[Job | Mapping[str, Any]], *, settings: Settings | None = None
) -> list[JobHandle]:
    """Prepare every job first (`prepare`: its TTS rendered, its URLs checked), then enqueue
    them all: none if any fails."""
    s = settings or get_settings()
    prepared = [prepare(j, settings=s) for j in jobs]
    return [enqueue(j, settings=s) for j in prepared]


def get_status(job_id: str, *, settings: Settings | None = None) -> dict[str, Any]:
    """The job's terminal record if it ended, else its live Celery state and progress."""
    s = settings or get_settings()
    ledger = ledger_for(s)
    record = ledger.record(job_id)
    if record is not None:
        return record
    # One read of the task's meta: state and info read apart can disagree mid-update.
    meta = celery_app(s).backend.get_task_meta(job_id)
    state, info = meta.get("status", "PENDING"), meta.get("result")
    status: dict[str, Any] = {"job_id": job_id, "celery_state": state}
    marks = ledger.marks(job_id)
    if marks.waiting is not None:
        # In line for a session of its avatar server (server, place, sessions, quota).
        status.update(status=Status.WAITING_FOR_AVATAR.value, **marks.waiting)
    elif marks.leased and marks.progress is not None:
        status.update(status=Status.PLAYING.value, **marks.progress)
    elif state == "PROGRESS" and isinstance(info, dict) and marks.leased:
        status.update(status=Status.PLAYING.value, **info)
    elif state in ("STARTED", "PROGRESS") and marks.leased:
        status["status"] = Status.PLAYING.value
    elif state in ("STARTED", "PROGRESS", "RETRY") or marks.enqueued:
        status["status"] = Status.QUEUED.value
    else:
        status["status"] = Status.UNKNOWN.value
    if marks.cancel_requested:
        status["cancel_requested"] = True
    return status


def avatar_capacity(settings: Settings | None = None) -> list[dict[str, Any]]:
    """Per configured avatar server: sessions held across the fleet, the effective quota
    (shrunk for a while after a 429) and the jobs waiting for a session (tasks/link/quota.py)."""
    s = settings or get_settings()
    servers = s.configured_avatar_servers()
    return ledger_for(s).capacity({name: server.max_sessions for name, server in servers.items()})


def is_terminal(status: Mapping[str, Any]) -> bool:
    return status.get("status") in TERMINAL


def cancel(job_id: str, *, settings: Settings | None = None) -> str:
    """Cancel a job: a queued job is dropped when a worker reaches it, a playing one stops
    within half a second (the avatar's buffer is cleared). Returns what the job was doing:
    "queued", "playing" or "ended" (too late: nothing changes)."""
    return ledger_for(settings or get_settings()).request_cancel(job_id)


@lru_cache(maxsize=4)
def redis_client(url: str) -> redis.Redis:
    return redisclient.client(url)


def ledger_for(settings: Settings) -> ProducerLedger:
    """The ledger of the deployment `settings` name (its scripts registered once per client)."""
    return ProducerLedger(redis_client(settings.redis_url))
