"""`producers.Client` uses the settings it was given, not the process's."""

from __future__ import annotations

import json

import pytest
import redis

from avatarq.celeryconfig import RENDER_QUEUE
from avatarq.ledger.producer import ProducerLedger
from avatarq.settings import Settings, get_settings
from avatarq_dev.processes import RedisServer
from producers import Client
from producers.client import celery_app


def test_client_talks_to_its_own_deployment(
    redis_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The process's own settings point nowhere: only the client's settings can work.
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:9/0")
    get_settings.cache_clear()
    try:
        c = Client(Settings(REDIS_URL=redis_server, AVATARQ_AVATAR_MAX_SESSIONS=4))
        handle = c.enqueue({"room": "lobby", "avatar_id": "anna", "source": "s3://b/k.wav"})
        assert handle.created
        assert (
            c.enqueue(
                {
                    "room": "lobby",
                    "avatar_id": "anna",
                    "source": "s3://b/k.wav",
                    "job_id": handle.job_id,
                }
            ).created
            is False
        )  # idempotent by id
        assert c.get_status(handle.job_id)["status"] == "queued"
        assert c.cancel(handle.job_id) == "queued"
        assert c.get_status(handle.job_id)["cancel_requested"] is True
        (default,) = c.avatar_capacity()
        assert (default["server"], default["quota"], default["sessions"]) == ("default", 4, 0)
        assert c.dead_letters() == []
    finally:
        get_settings.cache_clear()


def test_two_clients_two_deployments_in_one_process(
    redis_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The process's settings point nowhere; each client must use its own settings for its
    # broker, its ledger and its Celery configuration.
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:9/0")
    get_settings.cache_clear()
    try:
        with RedisServer() as other:
            urls = {"a": redis_server, "b": other.url}
            clients = {
                name: Client(Settings(REDIS_URL=url, AVATARQ_VISIBILITY_TIMEOUT=timeout))
                for (name, url), timeout in zip(urls.items(), (4111, 4222), strict=True)
            }
            stores = {name: redis.Redis.from_url(url) for name, url in urls.items()}
            before = {name: r.llen(RENDER_QUEUE) for name, r in stores.items()}
            ids = {
                name: c.enqueue(
                    {"room": f"room-{name}", "avatar_id": "anna", "source": "s3://b/k.wav"}
                ).job_id
                for name, c in clients.items()
            }
            for name, r in stores.items():
                elsewhere = next(n for n in urls if n != name)
                ledger = ProducerLedger(r)
                assert ledger.marks(ids[name]).enqueued
                assert not ledger.marks(ids[elsewhere]).enqueued
                queued = [json.loads(m)["headers"]["id"] for m in r.lrange(RENDER_QUEUE, 0, -1)]
                assert ids[name] in queued and ids[elsewhere] not in queued
                assert r.llen(RENDER_QUEUE) == before[name] + 1
            timeouts = {
                name: celery_app(c.settings).conf.broker_transport_options["visibility_timeout"]
                for name, c in clients.items()
            }
            assert timeouts == {"a": 4111, "b": 4222}
    finally:
        get_settings.cache_clear()
