"""Redis clients that give up on a silent connection within seconds.

Redis failing over to another host, or a route to it that dies, leaves open connections that
nothing answers and nothing closes: TCP's own retries would hold every command sent on them
for about 15 minutes, and a worker with them. Here a command that gets no answer in time
fails like a dropped connection: redis-py closes that connection and the next command opens
a new one.

A task using these clients may not stop at its first cancellation (`cancel_and_wait`)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import redis
import redis.asyncio as aioredis

log = logging.getLogger("avatarq.redis")

#: Longest a command waits for its answer. Every command avatarq sends answers at once (none
#: blocks), so only a connection nothing answers comes near it.
COMMAND_TIMEOUT_S = 5.0
#: Longest a new connection may take to open.
CONNECT_TIMEOUT_S = 5.0

TIMEOUTS: dict[str, Any] = {
    "socket_timeout": COMMAND_TIMEOUT_S,
    "socket_connect_timeout": CONNECT_TIMEOUT_S,
}

#: A task still running this long after it was cancelled is cancelled again ...
RECANCEL_EVERY_S = 0.1
#: ... until it ends, or this long has passed.
RECANCEL_FOR_S = 5.0


def async_client(url: str) -> aioredis.Redis:
    return aioredis.from_url(url, **TIMEOUTS)


def client(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, **TIMEOUTS)


async def cancel_and_wait(task: asyncio.Task[Any]) -> None:
    """Cancel `task` and wait until it ended; an error it ended with is raised here.

    With a socket timeout, redis-py sends each command under `asyncio.wait_for`, and Python
    3.11's `wait_for` drops a cancellation that lands as the send completes: the task goes on
    as if never cancelled (a lease watch renewed its lease for ever, and its job never ended).
    So it is cancelled again until it ends, within RECANCEL_FOR_S."""
    for _ in range(int(RECANCEL_FOR_S / RECANCEL_EVERY_S)):
        task.cancel()
        await asyncio.wait({task}, timeout=RECANCEL_EVERY_S)
        if task.done():
            if not task.cancelled():
                task.result()
            return
    log.error("a task still runs %gs after it was cancelled: %r", RECANCEL_FOR_S, task)
