"""The ledger's clock for leases that other processes read: Redis's own. Workers on machines
whose clocks disagree then agree on when a session slot or an announced quota runs out; with
their own clocks, one running ahead would count live slots as lapsed and exceed the quota."""

from __future__ import annotations

import redis
import redis.asyncio as aioredis


def _ms(reply: tuple[int, int]) -> int:
    seconds, micros = reply
    return int(seconds) * 1000 + int(micros) // 1000


async def server_ms(client: aioredis.Redis) -> int:
    """Redis's time now, in milliseconds."""
    return _ms(await client.time())


def server_ms_sync(client: redis.Redis) -> int:
    return _ms(client.time())  # type: ignore[arg-type]
