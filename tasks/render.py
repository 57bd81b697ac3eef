"""The render task: Celery's side of a job. The job itself runs in tasks/pipeline.py."""

from __future__ import annotations

import logging
from typing import Any

from celery import Task

from avatarq.celeryconfig import RENDER_TASK
from avatarq.errors import InvalidJob, JobError, TransientJobError
from avatarq.events import Event
from avatarq.settings import Settings, get_settings
from producers.jobs import Job, parse_job
from tasks import pipeline
from tasks.app import app
from tasks.backoff import backoff_delay
from tasks.report import JobReporter
from tasks.runtime import get_loop_thread

log = logging.getLogger("avatarq.render")


class JobFailed(Exception):
    """Raised to Celery after a job failed for good; its record holds the details."""


@app.task(
    name=RENDER_TASK,
    bind=True,
    acks_late=True,
    reject_on_worker_lost=True,
)
def render(self: Task, payload: dict[str, Any]) -> dict[str, Any]:
    """Play one job through its avatar in its LiveKit room and return the result.

    ``payload`` is a `producers.jobs.Job` as JSON; it is validated again here because any
    producer, in any language, may have sent it. Bad input fails at once and for good;
    transient faults (network, 5xx, timeouts) are retried up to `AVATARQ_MAX_RETRIES` times
    with exponential backoff and jitter, each attempt playing the job from the start.
    """
    settings = get_settings()
    attempt = self.request.retries + 1
    task_id = self.request.id
    job_id = str(payload.get("job_id") or task_id) if isinstance(payload, dict) else task_id
    runtime = get_loop_thread()

    def update_state(meta: dict[str, Any]) -> None:
        self.update_state(task_id=task_id, state="PROGRESS", meta=meta)

    try:
        job = parse_job(payload)
    except InvalidJob as e:
        runtime.run(_record_failure(settings, job_id, None, e, attempt))
        raise JobFailed(f"{e.reason}: {e.message}") from None

    try:
        return runtime.run(_play(job, settings, update_state, attempt))
    except JobError as e:
        if not e.permanent and self.request.retries < settings.max_retries:
            countdown = backoff_delay(
                self.request.retries, settings.retry_base_s, settings.retry_cap_s
            )
            log.warning(
                "job %s attempt %d: %s; retrying in %.1fs", job.job_id, attempt, e, countdown
            )
            runtime.run(_emit(settings, job.job_id, Event.RETRYING, e, attempt, countdown))
            raise self.retry(exc=e, countdown=countdown, max_retries=settings.max_retries) from None
        runtime.run(_record_failure(settings, job.job_id, job, e, attempt))
        raise JobFailed(f"{e.reason}: {e.message}") from None


async def _play(job: Job, settings: Settings, update_state: Any, attempt: int) -> dict[str, Any]:
    reporter = JobReporter(settings, job.job_id, update_state=update_state)
    try:
        try:
            result = await pipeline.play(job, settings, reporter, attempt=attempt)
        except TimeoutError:
            raise TransientJobError(
                "job overran its time limit (audio length plus start-up budget)",
                reason="job_timeout",
            ) from None
        except JobError:
            raise
        except Exception as e:
            # Unclassified: log the trace here, retry like any fault we cannot rule out.
            log.exception("job %s: unexpected error", job.job_id)
            raise TransientJobError(f"{type(e).__name__}: {e}", reason="internal_error") from None
        await reporter.finish(result, str(job.webhook_url) if job.webhook_url else None)
        return result
    finally:
        await reporter.aclose()


async def _emit(
    settings: Settings, job_id: str, event: Event, error: JobError, attempt: int, countdown: float
) -> None:
    reporter = JobReporter(settings, job_id)
    try:
        await reporter.emit(
            event, reason=error.reason, error=error.message, attempt=attempt, retry_in=countdown
        )
    finally:
        await reporter.aclose()


async def _record_failure(
    settings: Settings, job_id: str, job: Job | None, error: JobError, attempt: int
) -> None:
    result: dict[str, Any] = {
        "job_id": job_id,
        "status": "failed",
        "reason": error.reason,
        "error": error.message,
        "attempt": attempt,
    }
    if job is not None:
        result.update(room=job.room, avatar_id=job.avatar_id, metadata=job.metadata)
    reporter = JobReporter(settings, job_id)
    try:
        webhook = str(job.webhook_url) if job is not None and job.webhook_url else None
        await reporter.finish(result, webhook)
    finally:
        await reporter.aclose()
