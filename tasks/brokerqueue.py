"""What the broker still holds of a queue, where its transport lets a worker look.

Only Redis's lists can be read without taking from them; that is also the one broker that can
lose a message on its way to a worker (tasks/recovery.py, `LOST_AFTER_S`)."""

from __future__ import annotations

import json
from typing import Any

from celery import Celery

#: How long a look waits for a broker connection from the app's pool.
ACQUIRE_TIMEOUT_S = 5.0


def oldest_task_ids(app: Celery, queue: str) -> list[str] | None:
    """The task id of the oldest message in each of `queue`'s lists (one per priority step);
    an empty list when the queue is empty; None when this broker cannot be read this way."""
    with app.pool.acquire(block=True, timeout=ACQUIRE_TIMEOUT_S) as conn:
        if conn.transport.driver_type != "redis":
            return None
        channel: Any = conn.default_channel
        ids = []
        # kombu pushes to the left of a list and takes from the right: the oldest is last.
        # `_q_for_pri` is the transport's own name for a priority's list.
        for step in channel.priority_steps:
            raw = channel.client.lindex(channel._q_for_pri(queue, step), -1)
            if raw is None:
                continue
            try:
                ids.append(str(json.loads(raw)["headers"]["id"]))
            except (ValueError, KeyError, TypeError):
                return None  # not a message of Celery's protocol 2: no telling when it went in
        return ids
