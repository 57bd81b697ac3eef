"""Celery configuration shared by producers (sending) and workers (consuming).

Light on purpose: producers import it, so nothing here pulls LiveKit or ffmpeg in.
"""

from __future__ import annotations

import math
from typing import Any

from amqp.exceptions import PreconditionFailed
from celery import Celery
from kombu import Connection
from kombu.exceptions import OperationalError

from avatarq.redisclient import COMMAND_TIMEOUT_S, CONNECT_TIMEOUT_S, TIMEOUTS
from avatarq.settings import Settings

#: The render task's registered name; producers send by name and never import the worker.
RENDER_TASK = "avatarq.render"
RENDER_QUEUE = "avatarq"
#: Seconds between sweeps that hand jobs of dead workers back to the queue.
RESTORE_SWEEP_S = 5
#: The quorum queue's topic exchange: Celery's native delayed delivery routes due countdowns
#: back by routing-key pattern, which a direct exchange cannot match. Not the classic queue's
#: exchange name, which a broker that had the classic queue keeps as a direct one.
QUORUM_EXCHANGE = "avatarq.jobs"
#: Returns of one message (a consumer that left without acknowledging it) before a quorum
#: queue drops it, high enough never to be reached: the ledger counts a job's attempts and
#: records its end, and a message the broker dropped would end with no record.
QUORUM_DELIVERY_LIMIT = 1_000_000


#: How often kombu checks the Redis broker's long-lived connections (its default: 25 s).
BROKER_HEALTH_CHECK_S = 5


def celery_config(settings: Settings) -> dict[str, Any]:
    visibility = int(settings.redelivery_after_s)
    config: dict[str, Any] = {
        "broker_url": settings.broker_url,
        "result_backend": settings.result_backend,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "task_default_queue": RENDER_QUEUE,
        "task_routes": {RENDER_TASK: {"queue": RENDER_QUEUE}},
        # A job is acknowledged only once it ended, and handed back if its worker dies.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        # Redelivery of an unacked job must wait longer than the longest job can play.
        # Each worker sweeps for jobs abandoned by dead workers every few seconds (kombu's
        # default sweep is ~100 s, which would add minutes to every recovery).
        "broker_transport_options": {
            "visibility_timeout": visibility,
            "unacked_restore_interval": RESTORE_SWEEP_S,
            "unacked_restore_throttle": 1,
        },
        "result_backend_transport_options": {"visibility_timeout": visibility},
        # A result store on a connection nothing answers fails in seconds, and is retried
        # on a new one (avatarq/redisclient.py); Celery's own default waits 120 s.
        "redis_socket_timeout": COMMAND_TIMEOUT_S,
        "redis_socket_connect_timeout": CONNECT_TIMEOUT_S,
        "result_expires": 7 * 24 * 3600,
        # Celery would store STARTED before the task's body, and a Redis out of reach for
        # longer than the retries below would fail the delivery there, outside the body,
        # acknowledging (losing) its message. The render task stores it itself, best effort.
        "task_track_started": False,
        # A result store retried for a few seconds, then given up (a client's read of a
        # result also gives up within seconds).
        "result_backend_always_retry": True,
        "result_backend_max_retries": 8,
        "result_backend_base_sleep_between_retries_ms": 50,
        "result_backend_max_sleep_between_retries_ms": 1000,
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        "broker_connection_retry_on_startup": True,
        # A broker reconnect must not stop playing jobs, so this is set explicitly (not left to
        # Celery's default): they play on and record their end in the ledger, which the
        # broker's copies meet.
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        # All jobs of a worker process share one asyncio loop and one LiveKit runtime;
        # Celery's threads pool hands jobs to it (see tasks/runtime.py).
        "worker_pool": "threads",
        "worker_concurrency": settings.worker_concurrency,
        "worker_hijack_root_logger": False,
    }
    if _driver(settings.broker_url) == "redis":
        # The Redis broker's connections too (kombu's default waits for ever), and kombu's
        # check of a BRPOP nothing answers every few seconds: a worker that idled through a
        # failover takes jobs again within about 11 s, not 51 s.
        config["broker_transport_options"].update(
            TIMEOUTS, health_check_interval=BROKER_HEALTH_CHECK_S
        )
    if settings.rabbitmq_queue_type == "quorum" and _is_rabbitmq(settings.broker_url):
        config["task_queues"] = {RENDER_QUEUE: quorum_queue()}
    return config


def quorum_queue() -> dict[str, Any]:
    """The jobs' queue as a RabbitMQ quorum queue (as plain data: producers key their apps by
    the configuration's JSON). Celery sees `x-queue-type` and then limits prefetch per
    consumer (no global QoS) and sends countdowns through the broker's delay queues
    (`celery_delayed_*`) instead of holding them in a worker."""
    return {
        "exchange": QUORUM_EXCHANGE,
        "exchange_type": "topic",
        "routing_key": RENDER_QUEUE,
        "queue_arguments": {"x-queue-type": "quorum", "x-delivery-limit": QUORUM_DELIVERY_LIMIT},
    }


def _driver(broker_url: str) -> str:
    return str(Connection(broker_url).transport.driver_type)


def _is_rabbitmq(broker_url: str) -> bool:
    # Celery's own test for quorum queues (any amqp transport: amqp, amqps, pyamqp).
    return _driver(broker_url) == "amqp"


def broker_countdown(seconds: float) -> int:
    """A countdown as sent to the broker: whole seconds, rounded up. Native delayed delivery
    counts whole seconds and refuses a countdown under one."""
    return math.ceil(max(seconds, 0.0))


def check_queue_type(celery: Celery) -> None:
    """Stop a worker whose RabbitMQ broker has the jobs' queue as another type, saying what to
    do: the broker refuses to declare it again as ours, and Celery would only report that
    refusal from deep in its consumer's start."""
    with celery.connection_for_write() as conn:
        if conn.transport.driver_type != "amqp":
            return
        try:
            conn.ensure_connection(max_retries=1)
        except (OperationalError, OSError):
            return  # Celery waits for the broker itself
        queue = celery.amqp.queues[RENDER_QUEUE]
        try:
            queue.bind(conn.default_channel).declare()
        except PreconditionFailed as e:
            ours = (queue.queue_arguments or {}).get("x-queue-type", "classic")
            raise SystemExit(
                f"{e.reply_text}\nThe broker has the queue {RENDER_QUEUE!r} declared otherwise "
                f"than AVATARQ_RABBITMQ_QUEUE_TYPE={ours} does: set "
                "that setting to the queue's type, or empty the queue and delete it "
                "(docs/configuration.md, upgrading a broker that has the classic queue)."
            ) from e
