"""Jobs that exhausted their retries: list them, replay them, or drop them.

Workers push an entry (the job, its last reason and error, attempts, time) onto the Redis
list `avatarq:dead`; this is the operator's side of it (`avatarq dead list|retry|purge`).
"""

from __future__ import annotations

import json
from typing import Any

from avatarq.events import (
    DEAD_LETTER_KEY,
    job_attempts_key,
    job_cancel_key,
    job_enqueued_key,
    job_record_key,
)
from avatarq.settings import Settings, get_settings
from producers.client import JobHandle, enqueue, redis_client


def list_dead(*, settings: Settings | None = None, limit: int = 1000) -> list[dict[str, Any]]:
    """Dead-lettered jobs, newest first."""
    s = settings or get_settings()
    return [
        json.loads(raw) for raw in redis_client(s.redis_url).lrange(DEAD_LETTER_KEY, 0, limit - 1)
    ]


def retry_dead(job_id: str, *, settings: Settings | None = None) -> JobHandle:
    """Enqueue a dead-lettered job again under its own id, as a fresh job (attempts from 1)."""
    s = settings or get_settings()
    r: Any = redis_client(s.redis_url)  # redis-py types bytes replies as bytes | str
    raw = _find(r, job_id)
    if raw is None:
        raise KeyError(f"job {job_id} is not in the dead-letter list")
    # Its failed record would make workers skip it: this is a deliberate replay.
    r.delete(
        job_record_key(job_id),
        job_enqueued_key(job_id),
        job_attempts_key(job_id),
        job_cancel_key(job_id),
    )
    handle = enqueue(json.loads(raw)["job"], settings=s)
    r.lrem(DEAD_LETTER_KEY, 0, raw)
    return handle


def purge_dead(job_id: str | None = None, *, settings: Settings | None = None) -> int:
    """Drop one dead-lettered job, or all of them; returns how many were dropped."""
    s = settings or get_settings()
    r: Any = redis_client(s.redis_url)  # redis-py types bytes replies as bytes | str
    if job_id is None:
        count = int(r.llen(DEAD_LETTER_KEY))
        r.delete(DEAD_LETTER_KEY)
        return count
    raw = _find(r, job_id)
    return int(r.lrem(DEAD_LETTER_KEY, 0, raw)) if raw is not None else 0


def _find(r: Any, job_id: str) -> bytes | None:
    for raw in r.lrange(DEAD_LETTER_KEY, 0, -1):
        if json.loads(raw)["job_id"] == job_id:
            return raw  # type: ignore[no-any-return]
    return None
