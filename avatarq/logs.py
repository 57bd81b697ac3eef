"""Logging for workers and services: JSON lines for collectors, readable text on a terminal, and
the job's `job_id`, `room` and `avatar_id` on every line logged while the job runs.

The job context lives in contextvars, bound in Celery's `task_prerun`; the pipeline's coroutine
inherits it because `run_coroutine_threadsafe` copies the submitting thread's context."""

from __future__ import annotations

import contextvars
import json
import logging
import sys
from typing import Any, TextIO

JOB_FIELDS = ("job_id", "room", "avatar_id")
_job: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar(
    "avatarq_job", default=None
)


def bind_job(**fields: Any) -> None:
    """Attach job fields (those of JOB_FIELDS that are given) to every following log line of
    this thread or task, until `clear_job()`."""
    _job.set({k: str(v) for k, v in fields.items() if k in JOB_FIELDS and v is not None})


def bind_payload(payload: Any, task_id: str) -> None:
    """Bind what a job's payload (not validated yet) names: its id (else the task's), room
    and avatar."""
    fields = payload if isinstance(payload, dict) else {}
    bind_job(
        job_id=fields.get("job_id") or task_id,
        room=fields.get("room"),
        avatar_id=fields.get("avatar_id"),
    )


def clear_job() -> None:
    _job.set(None)


class JobContextFilter(logging.Filter):
    """Copies the bound job fields onto each record (as attributes both formatters read)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.job = _job.get() or {}
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": f"{record.created:.3f}",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            **getattr(record, "job", {}),
        }
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        job = getattr(record, "job", {})
        text = super().format(record)
        return f"{text} [{' '.join(f'{k}={v}' for k, v in job.items())}]" if job else text


def configure(
    level: int | str = logging.INFO, fmt: str = "auto", stream: TextIO | None = None
) -> None:
    """Replace the root logger's handlers with one writing `fmt` ("json", "text" or "auto":
    JSON unless `stream` is a terminal) to `stream` (stderr by default)."""
    stream = stream or sys.stderr
    as_json = fmt == "json" or (fmt == "auto" and not stream.isatty())
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if as_json else TextFormatter())
    handler.addFilter(JobContextFilter())
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(level)
