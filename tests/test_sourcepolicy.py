"""SSRF protection: which http(s) sources a job may make a worker fetch."""

from __future__ import annotations

import pytest

from avatarq.errors import InvalidJob
from avatarq.jobs import parse_job
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
    # The other spellings a resolver takes for an IPv4 address, and a root-anchored name.
    "http://127.1/a.wav",
    "http://2130706433/a.wav",
    "http://0x7f000001/a.wav",
    "http://017700000001/a.wav",
    "http://localhost./a.wav",
    # IPv4 inside IPv6: mapped, 6to4, NAT64 (a gateway forwards these to 10.0.0.5).
    "http://[::ffff:10.0.0.5]/a.wav",
    "http://[2002:a00:5::]/a.wav",
    "http://[64:ff9b::a00:5]/a.wav",
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
    for hook in ("http://127.0.0.1:9000/hook", "http://169.254.169.254/x", "http://localhost./h"):
        with pytest.raises(InvalidJob, match="AVATARQ_ALLOW_PRIVATE_WEBHOOKS") as info:
            enqueue({**job, "webhook_url": hook}, settings=settings)
        assert info.value.reason == "webhook_not_allowed"
    narrow = Settings(webhook_hosts="hooks.example.com")
    with pytest.raises(InvalidJob, match="'evil.example.net' is not in AVATARQ_WEBHOOK_HOSTS"):
        check_url("https://evil.example.net/h", webhook_policy(narrow), resolve=False)
    check_url("https://hooks.example.com/h", webhook_policy(narrow), resolve=False)


@pytest.mark.parametrize(
    "url",
    [
        "http://example.com:99999/a.mp3",
        "http://example.com:abc/a.mp3",
        "http://cdn.example.com\\@evil.example.net/a.mp3",
        "http://cdn.exa\u200bmple.com/a.mp3",
        "http:///a.mp3",
    ],
)
def test_a_source_url_the_worker_cannot_read_fails_the_job_at_once(url: str) -> None:
    # Not as a fetch retried for a network fault, minutes later: named, at enqueue.
    with pytest.raises(InvalidJob, match="source: source URL") as info:
        parse_job({"room": "r", "avatar_id": "a", "source": url}, Settings())
    assert info.value.permanent
