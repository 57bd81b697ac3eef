"""Exponential backoff with full jitter, so retrying workers don't move in lockstep, and the
one way a worker waits out an unreachable Redis."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from redis.exceptions import RedisError

from avatarq.errors import TransientJobError

log = logging.getLogger("avatarq.backoff")

T = TypeVar("T")


def backoff_delay(attempt: int, base: float = 0.5, cap: float = 8.0) -> float:
    """Delay before retry number `attempt + 1` (attempt counts from 0)."""
    return random.uniform(0, min(cap, base * 2**attempt))


class RedisUnreachable(TransientJobError):
    """Redis stayed out of reach for a whole `RedisPatience`: the job goes back to the queue
    (tasks/render.py), as failing would acknowledge its message, and lose it."""


@dataclass(frozen=True)
class RedisPatience:
    """How long a worker waits out an unreachable Redis (about a minute by default) before
    it gives up with `RedisUnreachable`."""

    attempts: int = 20
    base_s: float = 0.5
    cap_s: float = 5.0


async def outlast_redis(
    call: Callable[[], Awaitable[T]],
    *,
    doing: str,
    patience: RedisPatience,
    errors: tuple[type[BaseException], ...] = (RedisError,),
) -> T:
    """`await call()`, again after each Redis error within `patience`; then
    `RedisUnreachable`, saying what could not be done."""
    for attempt in range(patience.attempts):
        try:
            return await call()
        except errors as e:
            log.warning("Redis unreachable while %s (%s); trying again", doing, e)
            await asyncio.sleep(backoff_delay(attempt, patience.base_s, patience.cap_s))
    raise RedisUnreachable(f"Redis unreachable: gave up {doing}")
