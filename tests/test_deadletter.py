"""The dead-letter list, operator side, against a real Redis: list, replay, purge."""

from __future__ import annotations

import json
import time

import pytest
import redis

from avatarq.ledger.keys import DEAD_LETTER_KEY, job_enqueued_key, job_record_key
from avatarq.settings import Settings
from producers.deadletter import list_dead, purge_dead, retry_dead


def entry(job_id: str) -> str:
    job = {"job_id": job_id, "room": "dl-room", "avatar_id": "a", "source": "s3://b/k.wav"}
    failed = {"job_id": job_id, "status": "failed", "reason": "avatar_timeout", "attempt": 5}
    return json.dumps({"job": job, **failed, "error": "never joined", "ts": time.time()})


def test_list_retry_and_purge(redis_server: str) -> None:
    settings = Settings(REDIS_URL=redis_server, CELERY_BROKER_URL=redis_server)
    r = redis.Redis.from_url(redis_server)
    r.delete(DEAD_LETTER_KEY)
    for job_id in ("dl-1", "dl-2", "dl-3"):
        r.lpush(DEAD_LETTER_KEY, entry(job_id))
        # As a worker leaves it: the failed record and the enqueue marker.
        r.set(job_record_key(job_id), json.dumps({"job_id": job_id, "status": "failed"}))
        r.hset(job_enqueued_key(job_id), "ts", "1")

    assert [e["job_id"] for e in list_dead(settings=settings)] == ["dl-3", "dl-2", "dl-1"]

    queued = r.llen("avatarq")
    handle = retry_dead("dl-2", settings=settings)
    assert handle.job_id == "dl-2" and handle.created
    assert r.llen("avatarq") == queued + 1  # sent again, under its own id
    assert r.get(job_record_key("dl-2")) is None  # else workers would skip it as ended
    assert [e["job_id"] for e in list_dead(settings=settings)] == ["dl-3", "dl-1"]

    with pytest.raises(KeyError, match="dl-9 is not in the dead-letter list"):
        retry_dead("dl-9", settings=settings)
    assert purge_dead("dl-1", settings=settings) == 1
    assert purge_dead(settings=settings) == 1
    assert list_dead(settings=settings) == []
