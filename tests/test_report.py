"""Job reporting against a real Redis: events in order, progress throttle, signed webhook."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import itertools
import json
import logging
from typing import Any

import redis
from aiohttp import web

from avatarq.events import Event, JobStarted
from avatarq.ledger.keys import job_events_key, job_lease_key
from avatarq.results import Cancelled, Failed
from avatarq.settings import Settings
from producers.client import celery_app, get_status
from tasks.report import (
    PROGRESS_INTERVAL_S,
    STATE_INTERVAL_S,
    WEBHOOK_SIGNATURE_HEADER,
    WEBHOOK_TIMESTAMP_HEADER,
    JobReporter,
    WebhookOutbox,
)
from tests.httpserve import serving_app


def settings_for(redis_url: str, **kw: Any) -> Settings:
    return Settings(REDIS_URL=redis_url, AVATARQ_EVENTS_STREAM="test:events", **kw)


def entries(client: redis.Redis, key: str) -> list[dict[str, Any]]:
    out = []
    for _id, fields in client.xrange(key):
        f = {k.decode(): v.decode() for k, v in fields.items()}
        out.append({"event": f["event"], "job_id": f["job_id"], "data": json.loads(f["data"])})
    return out


def test_events_and_progress(redis_server: str) -> None:
    settings = settings_for(redis_server)
    states: list[dict[str, Any]] = []

    async def go() -> None:
        reporter = JobReporter(
            settings, "job-r1", update_state=states.append, outbox=WebhookOutbox(settings)
        )
        await reporter.emit(JobStarted(room="r", avatar_id="a", attempt=1))
        for i in range(5):  # within one second: only the first passes the throttle
            await reporter.progress(i * 0.1, 2.0)
        await reporter.progress(2.0, 2.0, force=True)
        cancelled = Cancelled(
            job_id="job-r1", attempt=1, cancelled_while="queued", seconds_streamed=0.0,
            playback_position=None, metadata={"x": 1},
        )  # fmt: skip
        await reporter.announce(cancelled, None)
        await reporter.aclose()

    asyncio.run(go())
    client = redis.Redis.from_url(redis_server)
    events = entries(client, job_events_key("job-r1"))
    assert [e["event"] for e in events] == [
        "job.started",
        "job.progress",
        "job.progress",
        "job.cancelled",
    ]
    assert [e["data"].get("seconds_streamed") for e in events[1:3]] == [0.0, 2.0]
    assert events == [e for e in entries(client, "test:events") if e["job_id"] == "job-r1"]
    assert states == [
        {"seconds_streamed": 0.0, "total_seconds": 2.0},
        {"seconds_streamed": 2.0, "total_seconds": 2.0},
    ]
    assert events[-1]["data"]["metadata"] == {"x": 1}
    assert client.ttl(job_events_key("job-r1")) > 0


def test_the_progress_state_is_rarer_than_the_events(redis_server: str) -> None:
    """Chunks every 0.4 s for 12 s: an event at most every PROGRESS_INTERVAL_S, the Celery
    state at most every STATE_INTERVAL_S, each state with an event; the final report writes
    both."""
    settings = settings_for(redis_server)
    states: list[float] = []
    now = [0.0]

    async def go() -> None:
        reporter = JobReporter(
            settings,
            "job-r2",
            update_state=lambda meta: states.append(meta["seconds_streamed"]),
            outbox=WebhookOutbox(settings),
            clock=lambda: now[0],
        )
        for i in range(30):
            now[0] = round(i * 0.4, 1)
            await reporter.progress(now[0], 12.0)
        await reporter.progress(12.0, 12.0, force=True)
        await reporter.aclose()

    asyncio.run(go())
    events = entries(redis.Redis.from_url(redis_server), job_events_key("job-r2"))
    sent = [e["data"]["seconds_streamed"] for e in events]
    assert sent[-1] == states[-1] == 12.0
    assert all(b - a >= PROGRESS_INTERVAL_S for a, b in itertools.pairwise(sent))
    assert all(b - a >= STATE_INTERVAL_S for a, b in itertools.pairwise(states[:-1]))
    assert set(states) <= set(sent) and 2 < len(states) < len(sent) / 2


def test_status_shows_the_latest_progress_event(redis_server: str) -> None:
    """A reader between two states sees the seconds of the latest event, not the state's."""
    settings = settings_for(redis_server)
    backend = celery_app(settings).backend
    now = [0.0]

    async def go() -> None:
        reporter = JobReporter(
            settings,
            "job-r4",
            update_state=lambda meta: backend.store_result("job-r4", meta, "PROGRESS"),
            outbox=WebhookOutbox(settings),
            clock=lambda: now[0],
        )
        for now[0] in (0.0, 1.2, 2.4):
            await reporter.progress(now[0], 6.0)
        await reporter.aclose()

    redis.Redis.from_url(redis_server).set(job_lease_key("job-r4"), "w/t", ex=60)
    asyncio.run(go())
    status = get_status("job-r4", settings=settings)
    assert (status["status"], status["seconds_streamed"], status["total_seconds"]) == (
        "playing",
        2.4,
        6.0,
    )
    assert backend.get_task_meta("job-r4")["result"]["seconds_streamed"] == 0.0


async def deliver(
    settings: Settings, job_id: str, handler: Any, path: str = "/hook", host: str = "127.0.0.1"
) -> None:
    """Announce a failed job whose webhook is `path` on a loopback aiohttp server."""
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    async with serving_app(app) as port:
        outbox = WebhookOutbox(settings)
        reporter = JobReporter(settings, job_id, outbox=outbox)
        try:
            result = Failed(job_id=job_id, attempt=1, reason="decode_error", error="not audio")
            await reporter.announce(result, f"http://{host}:{port}{path}")
            await outbox.aclose()
        finally:
            await reporter.aclose()


def test_webhook_signed_and_retried(redis_server: str) -> None:
    secret = "whsec-test"
    # The test's receiver is on loopback, which the webhook SSRF guard refuses by default.
    settings = settings_for(
        redis_server, AVATARQ_WEBHOOK_SECRET=secret, AVATARQ_ALLOW_PRIVATE_WEBHOOKS=True
    )
    received: list[tuple[dict[str, str], bytes]] = []

    async def hook(request: web.Request) -> web.Response:
        received.append((dict(request.headers), await request.read()))
        # The first delivery meets a server error and must be retried.
        return web.Response(status=503 if len(received) == 1 else 204)

    asyncio.run(deliver(settings, "job-w1", hook))
    assert len(received) == 2
    headers, body = received[-1]
    ts = headers[WEBHOOK_TIMESTAMP_HEADER]
    expected = hmac.new(secret.encode(), f"{ts}.".encode() + body, hashlib.sha256).hexdigest()
    assert headers[WEBHOOK_SIGNATURE_HEADER] == f"sha256={expected}"
    assert json.loads(body)["reason"] == "decode_error"
    assert secret not in body.decode()
    client = redis.Redis.from_url(redis_server)
    assert [e["event"] for e in entries(client, job_events_key("job-w1"))] == ["job.failed"]


def test_progress_nowait_never_holds_up_the_caller(redis_server: str) -> None:
    settings = settings_for(redis_server)
    release = asyncio.Event()
    states: list[float] = []

    def slow_state(meta: dict[str, Any]) -> None:  # the result backend, in a thread
        states.append(meta["seconds_streamed"])

    async def go() -> float:
        reporter = JobReporter(
            settings, "job-r3", update_state=slow_state, outbox=WebhookOutbox(settings)
        )
        original = reporter.emit

        async def held_emit(event: Event, **data: Any) -> None:
            await release.wait()  # Redis stalls: the audio loop must not notice
            await original(event, **data)

        reporter.emit = held_emit  # type: ignore[method-assign]
        loop = asyncio.get_running_loop()
        start = loop.time()
        for i in range(5):  # one report goes out; the rest are throttled or skipped
            reporter.progress_nowait(i * 0.1, 2.0)
        elapsed = loop.time() - start
        release.set()
        await reporter.settle_progress()
        await reporter.aclose()
        return elapsed

    assert asyncio.run(go()) < 0.05
    assert states == [0.0]
    names = [
        e["event"] for e in entries(redis.Redis.from_url(redis_server), job_events_key("job-r3"))
    ]
    assert names == ["job.progress"]


def test_webhook_to_a_private_address_is_not_sent(redis_server: str, caplog: Any) -> None:
    # Whatever level an earlier test left the loggers at in this process.
    caplog.set_level(logging.WARNING, logger="avatarq.report")
    settings = settings_for(redis_server, AVATARQ_WEBHOOK_SECRET="whsec-test")  # defaults
    received: list[str] = []

    async def hook(request: web.Request) -> web.Response:
        received.append(request.path)
        return web.Response(status=204)

    for host in ("127.0.0.1", "localhost"):
        asyncio.run(deliver(settings, "job-w2", hook, host=host))
    assert received == []
    assert "AVATARQ_ALLOW_PRIVATE_WEBHOOKS" in caplog.text
    # The job's own events are still written.
    events = entries(redis.Redis.from_url(redis_server), job_events_key("job-w2"))
    assert [e["event"] for e in events] == ["job.failed", "job.failed"]


def test_webhook_redirect_is_not_followed(redis_server: str, caplog: Any) -> None:
    # Whatever level an earlier test left the loggers at in this process.
    caplog.set_level(logging.WARNING, logger="avatarq.report")
    # Loopback receiver: private webhooks allowed; the redirect is what is tested.
    settings = settings_for(redis_server, AVATARQ_ALLOW_PRIVATE_WEBHOOKS=True)
    received: list[str] = []

    async def hook(request: web.Request) -> web.Response:
        received.append(request.path)
        if request.path == "/hook":
            raise web.HTTPTemporaryRedirect("/elsewhere")
        return web.Response(status=204)

    asyncio.run(deliver(settings, "job-w3", hook))
    assert received == ["/hook"]
    assert "redirects are not followed" in caplog.text


def test_webhooks_go_out_beside_the_next_job_in_each_rooms_order(redis_server: str) -> None:
    """A slow receiver holds up neither the announcing job (its room's next job plays at once)
    nor another room's webhook; a room's webhooks still arrive in its jobs' order."""
    # Loopback receiver: private webhooks allowed.
    settings = settings_for(redis_server, AVATARQ_ALLOW_PRIVATE_WEBHOOKS=True)
    arrived: list[str] = []

    async def hook(request: web.Request) -> web.Response:
        job_id = json.loads(await request.read())["job_id"]
        if job_id == "a1":
            await asyncio.sleep(1.0)  # the receiver is slow with the room's first job
        arrived.append(job_id)
        return web.Response(status=204)

    async def go() -> float:
        app = web.Application()
        app.router.add_post("/hook", hook)
        async with serving_app(app) as port:
            outbox = WebhookOutbox(settings)
            loop = asyncio.get_running_loop()
            began = loop.time()
            for job_id, room in (("a1", "ra"), ("a2", "ra"), ("b1", "rb")):
                reporter = JobReporter(settings, job_id, outbox=outbox)
                result = Failed(job_id=job_id, room=room, attempt=1, reason="decode_error",
                                error="not audio")  # fmt: skip
                await reporter.announce(result, f"http://127.0.0.1:{port}/hook")
                await reporter.aclose()
            announced = loop.time() - began
            await outbox.aclose()
            return announced

    assert asyncio.run(go()) < 0.5
    assert arrived == ["b1", "a1", "a2"]
