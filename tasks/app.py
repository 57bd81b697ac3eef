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
from kombu.transport import redis as kombu_redis
from redis.exceptions import ConnectionError as RedisConnectionError

from avatarq import logs
from avatarq.celeryconfig import celery_config, check_queue_type
from avatarq.settings import get_settings
from tasks import lklogs, metrics


def _guard_detached_redis_channels() -> None:
    """Keep a Redis restart from killing every worker that holds jobs.

    celery 5.7.0 (with kombu 5.7.0, redis-py 8.1.0) closes the broken broker connection after
    `Connection.collect()` (the change made for celery/celery#10302, "worker stops consuming
    after broker connection reset"). collect() has already detached the channels' transport,
    so closing a channel that holds unacknowledged jobs tries to restore them through
    `Channel._connparams`, which reads `transport.client.hostname` with `client` None: an
    AttributeError that Celery treats as unrecoverable, and the worker exits. Jobs acked later
    on such a channel hit the same path. No celery or kombu setting or release avoids it, so
    such a channel raises a connection error instead, which kombu and Celery already handle:
    the restore at close is skipped (the messages stay in Redis's unacked set, and
    tasks/recovery.py or the visibility timeout hand them back; the ledger drops copies of
    jobs that ended) and a late ack is logged as "Couldn't ack".
    """
    connparams = kombu_redis.Channel._connparams
    if getattr(connparams, "avatarq_guard", False):
        return

    def guarded(self: kombu_redis.Channel, asynchronous: bool = False) -> dict[str, Any]:
        transport = getattr(self, "connection", None)
        if transport is None or transport.client is None:
            raise RedisConnectionError("broker channel of a closed connection")
        return connparams(self, asynchronous=asynchronous)  # type: ignore[no-any-return]

    guarded.avatarq_guard = True  # type: ignore[attr-defined]
    kombu_redis.Channel._connparams = guarded  # type: ignore[method-assign]


_guard_detached_redis_channels()

# Configured from the settings when Celery first reads its configuration (the worker's
# start), not when this module is imported.
app = Celery("avatarq", include=["tasks.render"])
app.add_defaults(lambda: celery_config(get_settings()))


def quiet_livekit_logs() -> None:
    """The SDK forwards Rust/libwebrtc logs into Python; at debug levels that is a hex dump per
    SCTP packet, costing more CPU than streaming. Keep them at WARNING unless asked, and
    unless AVATARQ_LIVEKIT_LOG_CAPTURE, keep them out of Python altogether (tasks/lklogs.py)."""
    for name in ("livekit", "livekit.rtc"):
        logging.getLogger(name).setLevel(logging.WARNING)
    lklogs.capture_native_logs(get_settings().livekit_log_capture)


@setup_logging.connect
def _setup_logging(loglevel: int | str = logging.INFO, **_: Any) -> None:
    # Connecting this signal replaces Celery's own logging setup with ours (JSON lines).
    logs.configure(loglevel, get_settings().log_format)
    quiet_livekit_logs()


@worker_init.connect
def _check_queue_type(sender: Any, **_: Any) -> None:
    check_queue_type(sender.app)


@worker_init.connect
def _serve_metrics(**_: Any) -> None:
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
