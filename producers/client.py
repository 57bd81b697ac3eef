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

from avatarq.celeryconfig import RENDER_QUEUE, RENDER_TASK, celery_config
from avatarq.events import TERMINAL, Status, job_record_key
from avatarq.settings import Settings, get_settings
from producers.jobs import Job, parse_job
from producers.tts.render import render_job

#: Seconds of slack on top of a job's own length before Celery's hard time limit fires
#: (prefork pools only; the threads pool relies on the pipeline's own deadline).
TIME_LIMIT_SLACK_S = 300


@lru_cache(maxsize=4)
def _celery(broker: str, backend: str) -> Celery:
    app = Celery("avatarq-producer")
    app.conf.update(celery_config(get_settings()))
    app.conf.update(broker_url=broker, result_backend=backend)
    return app


def celery_app(settings: Settings | None = None) -> Celery:
    s = settings or get_settings()
    return _celery(s.broker_url, s.result_backend)


@dataclass(frozen=True)
class JobHandle:
    job_id: str
    result: AsyncResult

    def wait(self, timeout: float | None = None) -> dict[str, Any]:
        """Block until the job ends; returns its result (raises if it failed)."""
        return self.result.get(timeout=timeout, propagate=True)  # type: ignore[no-any-return]


def enqueue(job: Job | Mapping[str, Any], *, settings: Settings | None = None) -> JobHandle:
    """Validate and enqueue one job; the job id is also the Celery task id."""
    s = settings or get_settings()
    parsed = render_job(parse_job(dict(job) if isinstance(job, Mapping) else job), s)
    limit = (parsed.max_duration or s.max_job_duration_s) + TIME_LIMIT_SLACK_S
    res = celery_app(s).send_task(
        RENDER_TASK,
        args=[parsed.payload()],
        task_id=parsed.job_id,
        queue=RENDER_QUEUE,
        time_limit=limit,
        soft_time_limit=limit - 30,
    )
    return JobHandle(parsed.job_id, res)


def enqueue_many(
    jobs: Iterable[Job | Mapping[str, Any]], *, settings: Settings | None = None
) -> list[JobHandle]:
    """Validate every job first, then enqueue them all (none if any is invalid)."""
    parsed = [parse_job(dict(j) if isinstance(j, Mapping) else j) for j in jobs]
    return [enqueue(j, settings=settings) for j in parsed]


def get_status(job_id: str, *, settings: Settings | None = None) -> dict[str, Any]:
    """The job's terminal record if it ended, else its live Celery state and progress."""
    s = settings or get_settings()
    record = _redis(s.redis_url).get(job_record_key(job_id))
    if record is not None:
        return json.loads(record)  # type: ignore[no-any-return]
    res = AsyncResult(job_id, app=celery_app(s))
    state = res.state
    status: dict[str, Any] = {"job_id": job_id, "celery_state": state}
    if state == "PROGRESS" and isinstance(res.info, dict):
        status.update(status=Status.PLAYING.value, **res.info)
    elif state in ("STARTED", "RETRY"):
        status["status"] = Status.PLAYING.value if state == "STARTED" else Status.QUEUED.value
    else:
        status["status"] = Status.QUEUED.value  # PENDING: queued or unknown to Celery
    return status


def is_terminal(status: Mapping[str, Any]) -> bool:
    return status.get("status") in TERMINAL


def cancel(job_id: str, *, settings: Settings | None = None) -> None:
    """Revoke a queued job so no worker plays it."""
    celery_app(settings).control.revoke(job_id)


@lru_cache(maxsize=4)
def _redis(url: str) -> redis.Redis:
    return redis.Redis.from_url(url)
