"""Recovery from dead workers (tasks/recovery.py) and messages that must not end other jobs
(tasks/render.py), against a real Redis. The SIGKILL end to end runs in the fault suite."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis

from avatarq.celeryconfig import RENDER_QUEUE, RENDER_TASK
from avatarq.ledger.keys import (
    job_lease_key,
    job_record_key,
    room_holder_key,
    room_order_key,
    worker_heartbeat_key,
    worker_held_key,
)
from avatarq.ledger.sweeps import Sweeps
from avatarq.ledger.types import Claim, job_id_of
from avatarq.ledger.worker import Ledger
from avatarq.results import Failed
from avatarq.settings import Settings
from avatarq_dev.processes import ManagedProcess
from producers.client import celery_app, enqueue
from tasks import recovery
from tasks.brokerqueue import oldest_task_ids
from tasks.jobrun import Ending, JobParts, JobRun, Outcome
from tasks.recovery import Presence
from tasks.report import WEBHOOK_SIGNATURE_HEADER
from tests.fakes import FakeReporter
from tests.httpserve import serving


class _AvatarStops(BaseHTTPRequestHandler):
    calls: list[tuple[str, dict[str, Any], str | None]] = []

    def do_POST(self) -> None:  # noqa: N802 - stdlib's name
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.calls.append((self.path, body, self.headers.get("api-secret")))
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *_: Any) -> None:
        pass


@pytest.fixture
def own_db(redis_server: str) -> str:
    """A Redis database of the test's own, empty: other tests leave workers (and their held
    deliveries) in the session's Redis whose heartbeats expire, and a sweep would rightly
    take them."""
    url = redis_server.rsplit("/", 1)[0] + "/7"
    redis.Redis.from_url(url).flushdb()
    return url


@pytest.mark.parametrize("own_task_id", [False, True], ids=["enqueued", "sent-by-task-id"])
def test_dead_workers_deliveries_are_published_again_and_its_avatar_stopped(
    own_db: str, own_task_id: bool
) -> None:
    # A message sent without `enqueue` may carry its job under a task id of its own: the
    # job's lease and avatar note still go by the job's id.
    job_id = f"rec-{uuid.uuid4().hex[:8]}"
    task_id = f"task-{uuid.uuid4().hex[:8]}" if own_task_id else job_id
    payload = {"job_id": job_id, "room": job_id, "avatar_id": "a", "source": "a.wav"}
    # Evicting the dead job's avatar from its room meets no LiveKit server here: best effort.
    nowhere = "ws://127.0.0.1:9"
    published: list[tuple[str, dict[str, object]]] = []
    _AvatarStops.calls = []
    with serving(ThreadingHTTPServer(("127.0.0.1", 0), _AvatarStops)) as avatar_url:
        settings = Settings(
            REDIS_URL=own_db,
            AVALUMA_API_URL=avatar_url,
            AVALUMA_LICENSE_KEY="lic-1",
            LIVEKIT_URL=nowhere,
        )

        async def go() -> list[str]:
            dead = Presence(settings, lambda *a: published.append(a))
            live = Presence(settings, lambda *a: published.append(a))
            try:
                dead.hold(task_id, payload)
                await dead.beat_once()
                await live.beat_once()
                ledger = Ledger(dead.redis, stale_after_s=3600)
                await dead.redis.rpush(room_order_key(job_id), job_id)
                assert (await ledger.claim(job_id, job_id, dead.new_token()))[0] is Claim.OK
                await ledger.note_avatar_session(job_id, "default", "sess-9")
                # Alive: nothing to recover.
                assert await live.sweep_once() == []
                await dead.redis.delete(worker_heartbeat_key(dead.worker_id))  # SIGKILL
                recovered = await live.sweep_once()
                assert await live.sweep_once() == []  # taken once
                assert await Sweeps(ledger).avatar_session(job_id) is None
                # The dead worker's lease went with it: the job's next delivery may play.
                assert await dead.redis.get(job_lease_key(job_id)) is None
                return recovered
            finally:
                await dead.redis.aclose()
                await live.redis.aclose()

        assert asyncio.run(go()) == [task_id]
    assert published == [(task_id, payload)]
    assert _AvatarStops.calls == [("/v1/livekit/stop-avatar", {"session_id": "sess-9"}, "lic-1")]


def test_a_dead_workers_job_the_broker_refused_is_sent_again(
    own_db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job handed on from its lane to a worker that died has no message of its own in the
    broker: if publishing it again fails, the sweeper follows it and sends it again."""
    monkeypatch.setattr(recovery, "RESEND_AFTER_S", 0.05)
    job_id = f"refused-{uuid.uuid4().hex[:8]}"
    payload = {"job_id": job_id, "room": job_id, "avatar_id": "a", "source": "a.wav"}
    published: list[tuple[str, Any]] = []

    def publish(task_id: str, body: Any) -> None:
        if not published:
            published.append(("refused", body))
            raise ConnectionError("the broker is restarting")
        published.append((task_id, body))

    settings = Settings(REDIS_URL=own_db)

    async def go() -> None:
        dead = Presence(settings, lambda *a: None)
        live = Presence(settings, publish)
        try:
            dead.hold(job_id, payload)
            await dead.beat_once()
            await dead.redis.delete(worker_heartbeat_key(dead.worker_id))  # SIGKILL
            assert await live.sweep_once() == [job_id]
            assert published == [("refused", payload)] and job_id in live.held
            await asyncio.sleep(0.1)
            await live.beat_once()
            assert published == [("refused", payload), (job_id, payload)]
        finally:
            await dead.redis.aclose()
            await live.redis.aclose()

    asyncio.run(go())


def test_orphaned_session_on_an_unknown_server_gets_no_license(own_db: str) -> None:
    # A name the settings lack (a URL written into Redis, a server since removed): no call.
    job_id = f"rec-{uuid.uuid4().hex[:8]}"
    _AvatarStops.calls = []
    with serving(ThreadingHTTPServer(("127.0.0.1", 0), _AvatarStops)) as avatar_url:
        settings = Settings(
            REDIS_URL=own_db,
            AVALUMA_API_URL=avatar_url,
            AVALUMA_LICENSE_KEY="lic-1",
            LIVEKIT_URL="ws://127.0.0.1:9",
        )

        async def go() -> None:
            dead = Presence(settings, lambda *a: None)
            live = Presence(settings, lambda *a: None)
            try:
                dead.hold(job_id, {"job_id": job_id})
                await dead.beat_once()
                ledger = Ledger(dead.redis, stale_after_s=3600)
                await dead.redis.rpush(room_order_key(job_id), job_id)
                assert (await ledger.claim(job_id, job_id, dead.new_token()))[0] is Claim.OK
                await ledger.note_avatar_session(job_id, avatar_url, "sess-1")  # not a name
                await dead.redis.delete(worker_heartbeat_key(dead.worker_id))
                assert await live.sweep_once() == [job_id]
            finally:
                await dead.redis.aclose()
                await live.redis.aclose()

        asyncio.run(go())
    assert _AvatarStops.calls == []


def test_invalid_message_never_ends_a_job_it_does_not_own(redis_server: str) -> None:
    settings = Settings(REDIS_URL=redis_server, CELERY_BROKER_URL=redis_server)
    owner = f"own-{uuid.uuid4().hex[:8]}"
    enqueue({"job_id": owner, "room": "r", "avatar_id": "a", "source": "a.wav"}, settings=settings)
    garbage = {"job_id": owner, "room": 5, "bogus": True}
    orphan_id = f"bad-{uuid.uuid4().hex[:8]}"

    async def go() -> tuple[Outcome, Outcome]:
        r = aioredis.from_url(redis_server)
        try:
            # The real ledger on a real Redis; nothing may get as far as playing.
            parts = JobParts(
                settings=settings,
                ledger=Ledger(r, stale_after_s=3600),
                reporter=lambda _job_id: FakeReporter(),
                player=_NeverPlays(),
                shutting_down=lambda: False,
            )
            a = await JobRun(parts, garbage, "task-1", "w/t").run()
            b = await JobRun(parts, {"job_id": orphan_id, "room": 5}, "task-2", "w/t").run()
            return a, b
        finally:
            await r.aclose()

    hijack, own = asyncio.run(go())
    client = redis.Redis.from_url(redis_server)
    assert hijack.ending is Ending.DROPPED
    assert client.get(job_record_key(owner)) is None
    # An invalid message that is its own job still fails at once, for good.
    assert isinstance(own.result, Failed) and own.result.reason == "invalid_job"
    assert json.loads(client.get(job_record_key(orphan_id)))["status"] == "failed"


class _NeverPlays:
    async def play(self, job: Any, **_: Any) -> Any:
        raise AssertionError("an invalid message must not play")


def test_raw_payload_without_job_id_takes_its_task_id() -> None:
    assert job_id_of({"room": "r"}, "celery-task-1") == "celery-task-1"
    assert job_id_of({"room": "r", "job_id": ""}, "celery-task-1") == "celery-task-1"
    assert job_id_of({"job_id": "mine"}, "celery-task-1") == "mine"


def _worker(name: str, env: dict[str, str], log_dir: Path) -> ManagedProcess:
    proc = ManagedProcess(
        f"worker-{name}",
        [sys.executable, "-m", "celery", "-A", "tasks", "worker", "--loglevel", "INFO",
         "--concurrency", "2", "--hostname", f"{name}@%h", "--without-gossip",
         "--without-mingle"],
        ready=lambda: " ready." in proc.tail(200),
        env=env,
        log_dir=log_dir,
        start_timeout=60,
    )  # fmt: skip
    return proc


@pytest.mark.slow
@pytest.mark.parametrize("broker", ["redis", "rabbitmq"])
def test_sigkilled_workers_waiting_job_plays_on_another_worker_within_seconds(
    broker: str, redis_server: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    # Default settings: the Redis broker's visibility timeout (4200 s) would hold the job
    # for 70 minutes; RabbitMQ hands it back at once, to a worker that must not drop it.
    broker_url = (
        request.getfixturevalue("rabbitmq_server") if broker == "rabbitmq" else redis_server
    )
    env = {"REDIS_URL": redis_server, "CELERY_BROKER_URL": broker_url, "AVATARQ_METRICS_PORT": "0"}
    settings = Settings(**env)  # type: ignore[arg-type]
    client = redis.Redis.from_url(redis_server)
    room = f"rec-{uuid.uuid4().hex[:8]}"
    blocker, job_id = f"blocker-{room}", f"job-{room}"
    # Another job plays in the room (a live lease held elsewhere), so ours waits its turn.
    client.rpush(room_order_key(room), blocker)
    client.set(room_holder_key(room), blocker, px=120_000)
    client.set(job_lease_key(blocker), "elsewhere/x", px=120_000)
    enqueue({"job_id": job_id, "room": room, "avatar_id": "a", "source": str(tmp_path / "no.wav")},
            settings=settings)  # fmt: skip
    with _worker("victim", env, tmp_path) as victim:
        deadline = time.monotonic() + 30
        while not any(client.hexists(k, job_id) for k in client.scan_iter(worker_held_key("*"))):
            assert time.monotonic() < deadline, victim.tail()
            time.sleep(0.2)
        victim.signal(signal.SIGKILL)
        killed_at = time.monotonic()
        assert victim.proc is not None
        victim.proc.wait(10)
    with _worker("rescuer", env, tmp_path) as rescuer:
        # The room frees up: the blocker ends.
        client.set(job_record_key(blocker), "{}")
        client.delete(room_holder_key(room), job_lease_key(blocker))
        client.lrem(room_order_key(room), 0, blocker)
        while (record := client.get(job_record_key(job_id))) is None:
            assert time.monotonic() - killed_at < 45, rescuer.tail()
            time.sleep(0.2)
    # It ran to its (here: permanent) end on the rescuer: its source does not exist.
    assert json.loads(record)["reason"] == "source_not_found"


def test_a_delivery_sent_back_is_followed_until_another_worker_has_it(
    own_db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A retry lost between the broker and a worker killed as it took it (no receipt, no
    unacknowledged copy) is sent again by its sender; once another live worker holds it, the
    sender lets go."""
    monkeypatch.setattr(recovery, "RESEND_AFTER_S", 0.05)
    job_id = f"sent-{uuid.uuid4().hex[:8]}"
    payload = {"job_id": job_id, "room": job_id, "avatar_id": "a", "source": "a.wav"}
    published: list[tuple[str, Any]] = []
    settings = Settings(REDIS_URL=own_db)

    async def go() -> None:
        sender = Presence(settings, lambda *a: published.append(a))
        other = Presence(settings, lambda *a: None)
        try:
            sender.hold(job_id, payload)  # its delivery
            sender.sent_back(job_id, payload, 0.0)  # ends with a retry
            sender.let_go(job_id)  # the delivery is over
            await sender.beat_once()
            assert published == [] and job_id in sender.held  # not due yet
            await asyncio.sleep(0.1)
            await sender.beat_once()
            assert published == [(job_id, payload)]  # nobody has it: sent again
            other.hold(job_id, payload)  # received at last
            await other.beat_once()
            await sender.beat_once()
            assert job_id not in sender.held and sender.sent == {}
            await sender.beat_once()  # the next beat drops it from Redis too
            held = await sender.redis.hkeys(worker_held_key(sender.worker_id))
            assert job_id.encode() not in held
        finally:
            await sender.redis.aclose()
            await other.redis.aclose()

    asyncio.run(go())


def _lose_oldest_message(broker_url: str) -> str:
    """Take the broker's oldest message as a BRPOP whose connection then dropped does (the
    Redis server popped it; no worker ever sees it); its task id."""
    raw = redis.Redis.from_url(broker_url).rpop(RENDER_QUEUE)
    assert raw is not None
    return str(json.loads(raw)["headers"]["id"])


def test_a_message_the_redis_broker_lost_is_sent_again_once(
    own_db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A registered job whose message left the Redis broker and reached no worker is sent
    again, once per loss; a job whose message is still queued, one that a live worker holds
    and one that a worker claimed are not."""
    monkeypatch.setattr(recovery, "LOST_AFTER_S", 0.3)
    settings = Settings(REDIS_URL=own_db, CELERY_BROKER_URL=own_db)
    app = celery_app(settings)
    tag = uuid.uuid4().hex[:6]
    jobs = {
        name: {"job_id": f"{name}-{tag}", "room": f"{name}-{tag}", "avatar_id": "a",
               "source": "a.wav"}
        for name in ("first", "second", "third")
    }  # fmt: skip
    resent: list[str] = []

    def publish(task_id: str, payload: Any) -> None:
        resent.append(task_id)
        app.send_task(RENDER_TASK, args=[payload], task_id=task_id, queue=RENDER_QUEUE)

    async def go() -> None:
        sweeper = Presence(settings, publish, lambda: oldest_task_ids(app, RENDER_QUEUE))
        receiver = Presence(settings, lambda *a: None)
        try:
            for payload in jobs.values():
                enqueue(payload, settings=settings)
                await asyncio.sleep(0.5)
            await sweeper.sweep_once()
            assert resent == []  # all three are still queued, however old
            first = _lose_oldest_message(own_db)
            await sweeper.sweep_once()
            assert resent == [first] == [jobs["first"]["job_id"]]
            await asyncio.sleep(0.4)
            await sweeper.sweep_once()
            assert resent == [first]  # its new copy is queued behind the others
            # The second is taken by a worker that holds it, not yet claimed; the third's
            # worker claims it; both their messages are gone from the queue.
            second, third = _lose_oldest_message(own_db), _lose_oldest_message(own_db)
            receiver.hold(second, jobs["second"])
            await receiver.beat_once()
            ledger = Ledger(sweeper.redis, stale_after_s=3600)
            await ledger.claim(third, jobs["third"]["room"], sweeper.new_token())
            await asyncio.sleep(0.4)
            await sweeper.sweep_once()
            assert resent == [first]  # the first's copy is the oldest message queued
            _lose_oldest_message(own_db)  # and that copy is lost too
            await asyncio.sleep(0.4)
            await sweeper.sweep_once()
            assert resent == [first, first]
        finally:
            await sweeper.redis.aclose()
            await receiver.redis.aclose()

    asyncio.run(go())


def test_a_broker_that_cannot_be_peeked_is_not_read() -> None:
    # RabbitMQ acknowledges what it hands over (nothing is lost on the way); a look at it
    # must not even connect (nothing listens on port 1).
    app = celery_app(Settings(CELERY_BROKER_URL="amqp://guest:guest@127.0.0.1:1//"))
    assert oldest_task_ids(app, RENDER_QUEUE) is None


@pytest.mark.slow
def test_a_job_whose_message_the_redis_broker_lost_plays_on_a_live_worker(
    own_db: str, tmp_path: Path
) -> None:
    # A database of its own: the oldest message in the queue must be this test's. Default
    # settings. The loss itself (a worker's connection dropping as BRPOP hands it the
    # message) is a race; here the message is taken from the queue as that BRPOP took it.
    env = {
        "REDIS_URL": own_db,
        "CELERY_BROKER_URL": own_db,
        "AVATARQ_METRICS_PORT": "0",
    }
    settings = Settings(**env)  # type: ignore[arg-type]
    client = redis.Redis.from_url(own_db)
    job_id = f"lost-{uuid.uuid4().hex[:8]}"
    enqueue({"job_id": job_id, "room": job_id, "avatar_id": "a",
             "source": str(tmp_path / "no.wav")}, settings=settings)  # fmt: skip
    assert _lose_oldest_message(own_db) == job_id
    lost_at = time.monotonic()
    with _worker("live", env, tmp_path) as live:
        while (record := client.get(job_record_key(job_id))) is None:
            assert time.monotonic() - lost_at < recovery.LOST_AFTER_S + 30, live.tail()
            time.sleep(0.2)
    # It ran to its (here: permanent) end: its source does not exist.
    assert json.loads(record)["reason"] == "source_not_found"


class _SlowFirstReceiver(BaseHTTPRequestHandler):
    """A webhook receiver whose first request hangs (its sender dies meanwhile)."""

    bodies: list[tuple[bytes, str | None]] = []
    release = threading.Event()

    def do_POST(self) -> None:  # noqa: N802 - stdlib's name
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.bodies.append((body, self.headers.get(WEBHOOK_SIGNATURE_HEADER)))
        if len(self.bodies) == 1:
            self.release.wait(30)
        self.send_response(204)
        self.end_headers()

    def log_message(self, *_: Any) -> None:
        pass


@pytest.mark.slow
def test_a_webhook_its_worker_died_owing_is_delivered_by_another(
    redis_server: str, tmp_path: Path
) -> None:
    # Default settings but for a loopback receiver (private webhooks allowed) and a secret.
    _SlowFirstReceiver.bodies, _SlowFirstReceiver.release = [], threading.Event()
    env = {"REDIS_URL": redis_server, "CELERY_BROKER_URL": redis_server,
           "AVATARQ_METRICS_PORT": "0", "AVATARQ_ALLOW_PRIVATE_WEBHOOKS": "true",
           "AVATARQ_WEBHOOK_SECRET": "s3cret"}  # fmt: skip
    settings = Settings(**env)  # type: ignore[arg-type]
    client = redis.Redis.from_url(redis_server)
    job_id = f"hook-{uuid.uuid4().hex[:8]}"
    with serving(ThreadingHTTPServer(("127.0.0.1", 0), _SlowFirstReceiver)) as url:
        enqueue({"job_id": job_id, "room": job_id, "avatar_id": "a",
                 "source": str(tmp_path / "no.wav"), "webhook_url": f"{url}/hook"},
                settings=settings)  # fmt: skip
        with _worker("owing", env, tmp_path) as owing:
            deadline = time.monotonic() + 30
            while not _SlowFirstReceiver.bodies:  # its end is recorded; the webhook is out
                assert time.monotonic() < deadline, owing.tail()
                time.sleep(0.1)
            owing.signal(signal.SIGKILL)
            killed_at = time.monotonic()
        with _worker("rescuer", env, tmp_path) as rescuer:
            while len(_SlowFirstReceiver.bodies) < 2:
                assert time.monotonic() - killed_at < 45, rescuer.tail()
                time.sleep(0.2)
        _SlowFirstReceiver.release.set()
    record = client.get(job_record_key(job_id))
    (first, _), (again, signature) = _SlowFirstReceiver.bodies[:2]
    assert first == again and json.loads(again) == json.loads(record)
    assert json.loads(again)["reason"] == "source_not_found"
    assert signature is not None and signature.startswith("sha256=")
