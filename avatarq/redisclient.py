"""Redis clients that give up on a silent connection within seconds.

Redis failing over to another host, or a route to it that dies, leaves open connections that
nothing answers and nothing closes: TCP's own retries would hold every command sent on them
for about 15 minutes, and a worker with them. Here a command that gets no answer in time
fails like a dropped connection: redis-py closes that connection and the next command opens
a new one."""

from __future__ import annotations

from typing import Any

import redis
import redis.asyncio as aioredis

#: Longest a command waits for its answer. Every command avatarq sends answers at once (none
#: blocks), so only a connection nothing answers comes near it.
COMMAND_TIMEOUT_S = 5.0
#: Longest a new connection may take to open.
CONNECT_TIMEOUT_S = 5.0

TIMEOUTS: dict[str, Any] = {
    "socket_timeout": COMMAND_TIMEOUT_S,
    "socket_connect_timeout": CONNECT_TIMEOUT_S,
}


def async_client(url: str) -> aioredis.Redis:
    return aioredis.from_url(url, **TIMEOUTS)


def client(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, **TIMEOUTS)
