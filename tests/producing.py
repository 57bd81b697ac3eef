"""Helpers for the producer tests: run the `avatarq` CLI or its API server, give a test its own
Redis database, read what sits in the broker's render queue."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import redis

from avatarq.celeryconfig import RENDER_QUEUE
from avatarq_dev.processes import ManagedProcess

AVATARQ = str(Path(sys.executable).with_name("avatarq"))


def avatarq(
    *args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """The `avatarq` of this venv as a subprocess (its own process, as a user would run it)."""
    return subprocess.run(
        [AVATARQ, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def api_process(env: Mapping[str, str], log_dir: Path) -> ManagedProcess:
    """`avatarq api` as users run it, with `env`, not started; `.port` once it is."""
    return ManagedProcess(
        "api",
        lambda ports: [AVATARQ, "api", "--port", str(ports[0])],
        ports=["tcp"],
        env=env,
        log_dir=log_dir,
    )


def own_db(redis_url: str, db: int) -> str:
    """`redis_url` on database `db`, emptied: the session's Redis is shared between modules."""
    url = f"{redis_url.rsplit('/', 1)[0]}/{db}"
    redis.Redis.from_url(url).flushdb()
    return url


def queued_job_ids(client: redis.Redis) -> list[str]:
    """Job ids of the render messages waiting in the broker (Celery's task id is the job id)."""
    return [json.loads(m)["headers"]["id"] for m in client.lrange(RENDER_QUEUE, 0, -1)]


def queued_rooms(client: redis.Redis) -> dict[str, str]:
    """{job id: LiveKit room} of the render messages waiting in the broker (the room the
    worker will play into: the payload, Celery's first argument)."""
    rooms = {}
    for raw in client.lrange(RENDER_QUEUE, 0, -1):
        message = json.loads(raw)
        args = json.loads(base64.b64decode(message["body"]))[0]
        rooms[message["headers"]["id"]] = args[0]["room"]
    return rooms
