"""The worker's Celery app: `celery -A tasks worker` finds it as `tasks.app`."""

from __future__ import annotations

import logging
from typing import Any

from billiard.process import current_process
from celery import Celery
from celery.signals import (
    setup_logging,
    task_postrun,
    task_prerun,
    worker_init,
    worker_process_init,
)

from avatarq import logs
from avatarq.celeryconfig import celery_config, check_queue_type
from avatarq.settings import get_settings
from tasks import compat, metrics

# Configured from the settings when Celery first reads its configuration (the worker's
# start), not when this module is imported.
app = Celery("avatarq", include=["tasks.render"])
app.add_defaults(lambda: celery_config(get_settings()))


def quiet_livekit_logs() -> None:
    """The SDK's own loggers at WARNING, and unless AVATARQ_LIVEKIT_LOG_CAPTURE, its native
    logs out of Python altogether (tasks/compat.py)."""
    for name in ("livekit", "livekit.rtc"):
        logging.getLogger(name).setLevel(logging.WARNING)
    compat.capture_native_logs(get_settings().livekit_log_capture)


@setup_logging.connect
def _setup_logging(loglevel: int | str = logging.INFO, **_: Any) -> None:
    # Connecting this signal replaces Celery's own logging setup with ours (JSON lines).
    logs.configure(loglevel, get_settings().log_format)
    quiet_livekit_logs()


@worker_init.connect
def _start_worker(sender: Any, **_: Any) -> None:
    # Before the worker's consumer first connects to the broker.
    compat.guard_detached_redis_channels()
    check_queue_type(sender.app)
    # Threads and solo pools play jobs in this process; a prefork parent serves an empty
    # registry here, its children serve their own below.
    metrics.serve(get_settings().metrics_port)


@worker_process_init.connect
def _serve_child_metrics(**_: Any) -> None:
    port = get_settings().metrics_port
    index = getattr(current_process(), "index", None)
    if port and index is not None:
        # Prefork child i: its own registry on the next ports (one port per child).
        metrics.serve(port + 1 + index)


@task_prerun.connect
def _bind_job_logs(task_id: str, args: tuple[Any, ...] = (), **_: Any) -> None:
    logs.bind_payload(args[0] if args else None, task_id)


@task_postrun.connect
def _clear_job_logs(**_: Any) -> None:
    logs.clear_job()
