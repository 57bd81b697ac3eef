"""A Redis restart (here a crash, with redis-server's default persistence) under a real worker
that holds a job: the worker survives it and the job still ends. celery 5.7.0 closes the
broken broker connection in a way that made kombu raise an AttributeError Celery treats as
unrecoverable (tasks/app.py). The fault suite runs the same with audio playing."""

from __future__ import annotations

import json
import signal
import sys
import time
import uuid
from pathlib import Path

import pytest
import redis

from avatarq.ledger.keys import job_lease_key, job_record_key, room_holder_key, room_order_key
from avatarq.settings import Settings
from avatarq_dev.processes import ManagedProcess, RedisServer
from producers.client import enqueue


@pytest.mark.slow
def test_worker_holding_a_job_survives_a_redis_crash(tmp_path: Path) -> None:
    with RedisServer(data_dir=tmp_path / "redis", log_dir=tmp_path) as server:
        env = {"REDIS_URL": server.url, "AVATARQ_METRICS_PORT": "0"}
        client = redis.Redis.from_url(server.url)
        room = f"restart-{uuid.uuid4().hex[:8]}"
        blocker, job_id = f"blocker-{room}", f"job-{room}"
        # Another job holds the room, so the worker holds ours, waiting for its turn.
        client.rpush(room_order_key(room), blocker)
        client.set(room_holder_key(room), blocker, px=120_000)
        client.set(job_lease_key(blocker), "elsewhere/x", px=120_000)
        job = {"job_id": job_id, "room": room, "avatar_id": "a", "source": str(tmp_path / "x.wav")}
        enqueue(job, settings=Settings(**env))  # type: ignore[arg-type]
        worker = ManagedProcess(
            "worker",
            [sys.executable, "-m", "celery", "-A", "tasks", "worker", "--loglevel", "INFO",
             "--concurrency", "2", "--without-gossip", "--without-mingle"],
            ready=lambda: " ready." in worker.tail(200),
            env=env,
            log_dir=tmp_path,
            start_timeout=60,
        )  # fmt: skip
        with worker:
            deadline = time.monotonic() + 30
            while "received" not in worker.tail(200):
                assert time.monotonic() < deadline, worker.tail()
                time.sleep(0.2)
            server.signal(signal.SIGKILL)  # a crash: nothing saved since the last snapshot
            assert server.proc is not None
            server.proc.wait(10)
            server.start()
            # Redis lost the room's order and the blocker: the job rejoins and plays (here:
            # fails for good, its source does not exist) on the worker that held it.
            deadline = time.monotonic() + 60
            while (record := client.get(job_record_key(job_id))) is None:
                assert worker.proc is not None and worker.proc.poll() is None, worker.tail()
                assert time.monotonic() < deadline, worker.tail()
                time.sleep(0.2)
            assert "Unrecoverable error" not in worker.tail(5000)
            assert worker.proc is not None and worker.proc.poll() is None
    assert json.loads(record)["reason"] == "source_not_found"
