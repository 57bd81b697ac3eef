"""Celery configuration shared by producers (sending) and workers (consuming).

Light on purpose: producers import it, so nothing here pulls LiveKit or ffmpeg in.
"""

from __future__ import annotations

from typing import Any

from avatarq.settings import Settings

#: The render task's registered name; producers send by name and never import the worker.
RENDER_TASK = "avatarq.render"
RENDER_QUEUE = "avatarq"
#: Seconds between sweeps that hand jobs of dead workers back to the queue.
RESTORE_SWEEP_S = 5


def celery_config(settings: Settings) -> dict[str, Any]:
    visibility = int(settings.redelivery_after_s)
    return {
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
        "result_expires": 7 * 24 * 3600,
        "task_track_started": True,
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
