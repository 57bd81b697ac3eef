"""SSRF protection: which http(s) sources a job may make a worker fetch."""

from __future__ import annotations

import pytest

from avatarq.errors import InvalidJob
from avatarq.settings import Settings
from avatarq.sourcepolicy import check_source_url, check_url, webhook_policy
from producers.client import enqueue
from tasks.source import resolve

PRIVATE = [
    "http://127.0.0.1:8080/a.wav",
    "http://localhost/a.wav",
    "http://10.1.2.3/a.wav",
    "http://192.168.0.10/a.wav",
    "http://169.254.169.254/latest/meta-data/",
    "http://[::1]/a.wav",
    "http://[fd00::5]/a.wav",
]


@pytest.mark.parametrize("url", PRIVATE)
def test_private_addresses_refused_by_default(url: str) -> None:
    with pytest.raises(InvalidJob, match="private address") as exc:
        check_source_url(url, Settings(), resolve=False)
    assert exc.value.reason == "source_not_allowed" and exc.value.permanent


@pytest.mark.parametrize("url", PRIVATE)
def test_private_addresses_allowed_when_configured(url: str) -> None:
    check_source_url(url, Settings(allow_private_sources=True), resolve=False)


def test_public_address_and_other_schemes_pass() -> None:
    for url in ("https://93.184.216.34/a.mp3", "s3://bucket/a.wav", "/tmp/a.wav"):
        check_source_url(url, Settings(), resolve=False)


def test_host_allowlist() -> None:
    settings = Settings(source_hosts="cdn.example.com, *.media.example.org")
    check_source_url("https://cdn.example.com/a.mp3", settings, resolve=False)
    check_source_url("https://eu.media.example.org/a.mp3", settings, resolve=False)
    with pytest.raises(InvalidJob, match="'evil.example.net' is not in AVATARQ_SOURCE_HOSTS"):
        check_source_url("https://evil.example.net/a.mp3", settings, resolve=False)


def test_worker_refuses_before_ffmpeg_opens_anything() -> None:
    with pytest.raises(InvalidJob, match="private address"):
        resolve("http://169.254.169.254/latest/meta-data/iam", Settings())


def test_producer_refuses_at_enqueue(redis_server: str) -> None:
    settings = Settings(REDIS_URL=redis_server, CELERY_BROKER_URL=redis_server)
    job = {"room": "r", "avatar_id": "a", "source": "http://10.0.0.8/internal.wav"}
    with pytest.raises(InvalidJob, match="private address"):
        enqueue(job, settings=settings)


def test_producer_refuses_a_private_webhook_at_enqueue(redis_server: str) -> None:
    settings = Settings(REDIS_URL=redis_server, CELERY_BROKER_URL=redis_server)
    job = {"room": "r", "avatar_id": "a", "source": "s3://b/k.wav"}
    for hook in ("http://127.0.0.1:9000/hook", "http://169.254.169.254/x"):
        with pytest.raises(InvalidJob, match="AVATARQ_ALLOW_PRIVATE_WEBHOOKS") as info:
            enqueue({**job, "webhook_url": hook}, settings=settings)
        assert info.value.reason == "webhook_not_allowed"
    narrow = Settings(webhook_hosts="hooks.example.com")
    with pytest.raises(InvalidJob, match="'evil.example.net' is not in AVATARQ_WEBHOOK_HOSTS"):
        check_url("https://evil.example.net/h", webhook_policy(narrow), resolve=False)
    check_url("https://hooks.example.com/h", webhook_policy(narrow), resolve=False)
