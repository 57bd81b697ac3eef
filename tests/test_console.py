"""The console's server side, over HTTP against a real Redis: its data needs a key, the overview
lists each room's jobs in play order with recent outcomes and dead letters, dead letters can be
retried, the viewer token may only subscribe, and without a build the API still serves with the
console disabled. The page itself is tested in a real browser in test_console_browser.py."""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import requests
import uvicorn
from livekit import api as lkapi

from avatarq.events import Event
from avatarq.ledger.keys import DEAD_LETTER_KEY
from avatarq.settings import Settings
from avatarq_dev.demo import ConsoleAccess, console_line
from producers import console, enqueue
from producers.api import create_app
from tests.producing import api_process, own_db, queued_job_ids

KEY = "console-key"  # tenant acme
AUTH = {"X-API-Key": KEY}
OTHER = {"X-API-Key": "other-key"}  # tenant globex
API_KEYS = f"acme:{KEY},globex:other-key"
DB = 5
LIVEKIT_SECRET = "console-test-secret-0123456789abcdef"


@pytest.fixture(scope="module")
def redis_url(redis_server: str) -> str:
    return own_db(redis_server, DB)


@pytest.fixture(scope="module")
def settings(redis_url: str) -> Settings:
    return Settings(
        REDIS_URL=redis_url, LIVEKIT_API_SECRET=LIVEKIT_SECRET, AVATARQ_API_KEYS=API_KEYS
    )


@pytest.fixture(scope="module")
def base(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`avatarq api` as users run it, on this module's Redis database."""
    env = {
        "REDIS_URL": redis_url,
        "AVATARQ_API_KEYS": API_KEYS,
        "LIVEKIT_API_SECRET": LIVEKIT_SECRET,
        # Browsers reach LiveKit elsewhere than workers do (viewer tokens carry this URL).
        "LIVEKIT_PUBLIC_URL": "wss://livekit.public.example",
    }
    with api_process(env, tmp_path_factory.mktemp("console-api")) as proc:
        yield f"http://127.0.0.1:{proc.port}"


def test_console_data_needs_a_key(base: str) -> None:
    for method, path in (("GET", "/console/api/overview"), ("POST", "/console/api/viewer-token")):
        assert requests.request(method, base + path, timeout=10).status_code == 401
        wrong = requests.request(method, base + path, headers={"X-API-Key": "nope"}, timeout=10)
        assert wrong.status_code == 403
    assert requests.get(f"{base}/console/api/overview", headers=AUTH, timeout=10).ok
    # The root leads to the page.
    root = requests.get(base, allow_redirects=False, timeout=10)
    assert root.status_code == 307 and root.headers["Location"] == "/console/"


def test_overview_shows_the_tenants_rooms_in_order_with_outcomes_and_dead_letters(
    base: str, settings: Settings
) -> None:
    r = redis.Redis.from_url(settings.redis_url)
    # No worker runs here: enqueued jobs stay queued, in their rooms' order. Job ids and rooms
    # as the API names them: `{tenant}:{id}`, `{tenant}:{room}`.
    for job_id, room in (
        ("acme:ov-a1", "acme:ov-a"),
        ("ov-py1", "acme:ov-a"),  # a Python producer's job in acme's room
        ("acme:ov-b1", "acme:ov-b"),
        ("acme:ov-a2", "acme:ov-a"),
        ("globex:ov-x1", "globex:ov-a"),  # globex's own `ov-a`
        ("globex:ov-x2", "globex:ov-x"),
        ("acme:ov-c1", "ov-c"),  # a room no tenant can name through the API
    ):
        enqueue(
            {"job_id": job_id, "room": room, "avatar_id": "anna", "source": "s3://b/k.wav"},
            settings=settings,
        )
    # Terminal events as workers write them to the global stream (avatarq/events.py).
    for job_id, event, data in (
        ("acme:ov-done", Event.COMPLETED, {"status": "completed", "room": "acme:ov-a"}),
        ("globex:ov-theirs", Event.FAILED, {"status": "failed", "reason": "invalid_audio"}),
        ("acme:ov-bad", Event.FAILED, {"status": "failed", "reason": "invalid_audio"}),
        ("acme:ov-p", Event.PROGRESS, {"seconds_streamed": 1.0}),
    ):
        fields = {"event": event.value, "job_id": job_id, "ts": str(time.time())}
        r.xadd(settings.events_stream, {**fields, "data": json.dumps(data)})
    for job_id, room in (("acme:ov-dead", "acme:ov-a"), ("globex:ov-their-dead", "globex:ov-a")):
        job = {"job_id": job_id, "room": room, "avatar_id": "anna", "source": "s3://b/x"}
        r.lpush(DEAD_LETTER_KEY, json.dumps({"job": job, "job_id": job_id, "reason": "x"}))

    data = requests.get(f"{base}/console/api/overview", headers=AUTH, timeout=10).json()

    rooms = {room["room"]: room for room in data["rooms"]}
    assert set(rooms) == {"ov-a", "ov-b"}  # its own rooms, under its own names
    assert [j["job_id"] for j in rooms["ov-a"]["jobs"]] == ["ov-a1", "ov-a2"]
    assert rooms["ov-a"]["others"] == 1  # the Python producer's job takes its turn in between
    assert [j["job_id"] for j in rooms["ov-b"]["jobs"]] == ["ov-b1"]
    first = rooms["ov-a"]["jobs"][0]
    assert (first["status"], first["avatar_id"], first["source"]) == (
        "queued",
        "anna",
        "s3://b/k.wav",
    )
    recent = [(e["job_id"], e["status"], e["reason"], e["room"]) for e in data["recent"]]
    assert recent == [
        ("ov-bad", "failed", "invalid_audio", None),
        ("ov-done", "completed", None, "ov-a"),
    ]
    dead = [(d["job_id"], d["job"]["job_id"], d["job"]["room"]) for d in data["dead"]]
    assert dead == [("ov-dead", "ov-dead", "ov-a")]

    theirs = requests.get(f"{base}/console/api/overview", headers=OTHER, timeout=10).json()
    assert {room["room"]: [j["job_id"] for j in room["jobs"]] for room in theirs["rooms"]} == {
        "ov-a": ["ov-x1"],
        "ov-x": ["ov-x2"],
    }
    assert [room["others"] for room in theirs["rooms"]] == [0, 0]
    assert [e["job_id"] for e in theirs["recent"]] == ["ov-theirs"]
    assert [d["job_id"] for d in theirs["dead"]] == ["ov-their-dead"]


def test_retry_a_dead_letter(base: str, settings: Settings) -> None:
    r = redis.Redis.from_url(settings.redis_url)
    job = {"job_id": "acme:rt-dead", "room": "rt", "avatar_id": "anna", "source": "s3://b/k.wav"}
    r.lpush(DEAD_LETTER_KEY, json.dumps({"job": job, "job_id": "acme:rt-dead", "reason": "x"}))
    url = f"{base}/console/api/dead/rt-dead/retry"
    # Another tenant's key cannot replay it: to them it does not exist.
    other = requests.post(url, headers=OTHER, timeout=10)
    assert other.status_code == 404 and "rt-dead" in other.json()["detail"]
    assert requests.post(url, headers=AUTH, timeout=10).json() == {
        "job_id": "rt-dead",
        "created": True,
    }
    assert "acme:rt-dead" in queued_job_ids(r)
    assert all(json.loads(e)["job_id"] != "acme:rt-dead" for e in r.lrange(DEAD_LETTER_KEY, 0, -1))


def test_viewer_token_may_only_subscribe_to_its_room(base: str) -> None:
    res = requests.post(
        f"{base}/console/api/viewer-token", json={"room": "lobby"}, headers=AUTH, timeout=10
    )
    assert res.status_code == 200, res.text
    body = res.json()
    assert LIVEKIT_SECRET not in res.text
    assert body["room"] == "lobby" and body["identity"].startswith("console-")
    assert body["url"] == "wss://livekit.public.example"
    claims = lkapi.TokenVerifier("devkey", LIVEKIT_SECRET).verify(body["token"])
    grants = claims.video
    assert grants is not None and claims.identity == body["identity"]
    # The tenant's `lobby` is its own LiveKit room: the token admits to nothing else.
    assert (grants.room_join, grants.room, grants.can_subscribe) == (True, "acme:lobby", True)
    assert grants.can_publish is False and grants.can_publish_data is False
    assert not grants.room_admin and not grants.room_create and grants.hidden
    theirs = requests.post(
        f"{base}/console/api/viewer-token", json={"room": "lobby"}, headers=OTHER, timeout=10
    ).json()
    assert lkapi.TokenVerifier("devkey", LIVEKIT_SECRET).verify(theirs["token"]).video.room == (
        "globex:lobby"
    )
    # No name reaches another tenant's room (the separator is refused), nor a malformed one.
    for room in ("no spaces", "globex:lobby", "acme:lobby"):
        bad = requests.post(
            f"{base}/console/api/viewer-token", json={"room": room}, headers=AUTH, timeout=10
        )
        assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["body", "room"]


def test_console_page_and_assets_carry_the_security_headers(base: str) -> None:
    page = requests.get(f"{base}/console/", timeout=10)
    assert page.status_code == 200
    asset = re.search(r'src="(/console/assets/[^"]+\.js)"', page.text)
    assert asset, page.text[:500]
    script = requests.get(base + asset.group(1), timeout=10)
    for res in (page, script):
        csp = res.headers["Content-Security-Policy"]
        assert "script-src 'self';" in csp and "frame-ancestors 'none'" in csp
        # The room view reaches LiveKit where browsers do (LIVEKIT_PUBLIC_URL), and only there.
        assert (
            "connect-src 'self' wss://livekit.public.example https://livekit.public.example;" in csp
        )
        assert res.headers["X-Frame-Options"] == "DENY"
        assert res.headers["X-Content-Type-Options"] == "nosniff"
    # The page has no inline script the policy would block.
    assert "<script>" not in page.text and '<script type="module">' not in page.text


@pytest.fixture
def served_without_build(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[str]:
    """The app in-process (uvicorn on a thread) with the console's build missing."""
    monkeypatch.setattr(console, "CONSOLE_DIST", tmp_path / "dist")
    server = uvicorn.Server(uvicorn.Config(create_app(settings), log_level="warning"))
    # Bound here, before uvicorn listens on it: no port number to lose in between.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        deadline = time.monotonic() + 20
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        try:
            yield f"http://127.0.0.1:{sock.getsockname()[1]}"
        finally:
            server.should_exit = True
            thread.join(10)


def test_api_serves_with_the_console_disabled_without_a_build(
    served_without_build: str, caplog: pytest.LogCaptureFixture
) -> None:
    page = requests.get(f"{served_without_build}/console/", timeout=10)
    assert page.status_code == 503
    assert "console disabled" in page.text and "npm ci && npm run build" in page.text
    warnings = [r.getMessage() for r in caplog.get_records("setup") if r.name == "avatarq.console"]
    assert any("console disabled" in w for w in warnings), warnings
    # Everything else still works.
    other = requests.get(f"{served_without_build}/jobs/x", headers=AUTH, timeout=10)
    assert other.status_code == 404


def test_demo_keep_without_a_build_says_where_the_api_is(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `make demo` builds no console: `avatarq demo --keep` must not print a URL to a 503.
    access = ConsoleAccess(api_keys="demo:k-1", key="k-1", tenant="demo")
    monkeypatch.setattr(console, "CONSOLE_DIST", tmp_path)
    (tmp_path / "index.html").write_text("<!doctype html>")
    built = console_line("http://127.0.0.1:8000", access)
    assert built == "console: http://127.0.0.1:8000/console/#key=k-1"
    (tmp_path / "index.html").unlink()
    line = console_line("http://127.0.0.1:8000", access)
    assert line.startswith("console: not built (cd console && npm ci && npm run build")
    assert line.endswith("the API serves at http://127.0.0.1:8000, X-API-Key: k-1")


def test_overview_shows_each_avatar_servers_session_quota(base: str, settings: Settings) -> None:
    """What tasks/link/quota.py keeps in Redis: two live sessions, one expired, one waiting job."""
    from avatarq.ledger.keys import avatar_quota_key

    r = redis.Redis.from_url(settings.redis_url)
    now_ms = int(time.time() * 1000)
    sessions = avatar_quota_key("default", "sessions")
    r.zadd(sessions, {"live-1": now_ms + 60_000, "live-2": now_ms + 60_000, "dead": now_ms - 1})
    r.zadd(avatar_quota_key("default", "waiting"), {"acme:waits": now_ms})
    try:
        data = requests.get(f"{base}/console/api/overview", headers=AUTH, timeout=10).json()
        (row,) = [c for c in data["avatar_servers"] if c["server"] == "default"]
        assert row == {"server": "default", "sessions": 2, "quota": 10, "waiting": 1}
    finally:
        r.delete(sessions, avatar_quota_key("default", "waiting"))
