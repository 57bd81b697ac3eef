"""The HTTP API as a real uvicorn subprocess on a free port against a real Redis: auth,
validation, body cap, idempotency, status, cancel, SSE and the OpenAPI document."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import requests

from avatarq.ledger.keys import job_events_key, job_record_key
from avatarq.settings import Settings
from avatarq_dev.processes import ManagedProcess
from producers.client import ledger_for
from tests.ports import refused_port
from tests.producing import api_process, avatarq, own_db, queued_job_ids, queued_rooms

KEYS = ("acme:key-one", "globex:key-two")
MAX_BODY = 4096
AUTH = {"Authorization": "Bearer key-one"}  # tenant acme
OTHER = {"X-API-Key": "key-two"}  # tenant globex
JOB = {"room": "lobby", "avatar_id": "anna", "source": "https://cdn.example/hello.wav"}


def start_api(env: dict[str, str], log_dir: Path) -> tuple[ManagedProcess, str]:
    """`avatarq api`, started, with `env` (REDIS_URL, …) and this module's keys; its URL."""
    env = {"AVATARQ_API_KEYS": ",".join(KEYS), "AVATARQ_API_MAX_BODY_BYTES": str(MAX_BODY), **env}
    proc = api_process(env, log_dir).start()
    return proc, f"http://127.0.0.1:{proc.port}"


def sse_frames(response: requests.Response) -> list[dict[str, Any]]:
    """Parse an event stream into frames {id, event, data}; comments are skipped."""
    frames, frame = [], {}
    for line in response.iter_lines(decode_unicode=True):
        if not line:
            if frame:
                frames.append(frame)
            frame = {}
        elif not line.startswith(":"):
            key, _, value = line.partition(": ")
            frame[key] = json.loads(value) if key == "data" else value
    return frames


@pytest.fixture(scope="module")
def api(redis_server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    proc, base = start_api({"REDIS_URL": own_db(redis_server, 3)}, tmp_path_factory.mktemp("api"))
    with proc:
        yield base


@pytest.fixture
def r(redis_server: str) -> redis.Redis:
    return redis.Redis.from_url(redis_server.rsplit("/", 1)[0] + "/3")


def test_api_keys(api: str) -> None:
    missing = requests.get(f"{api}/jobs/x1", timeout=10)
    assert missing.status_code == 401 and missing.headers["WWW-Authenticate"] == "Bearer"
    assert "X-API-Key" in missing.json()["detail"]
    assert (
        requests.get(f"{api}/jobs/x1", headers={"X-API-Key": "nope"}, timeout=10).status_code == 403
    )
    wrong = {"Authorization": "Bearer nope"}
    assert requests.get(f"{api}/jobs/x1", headers=wrong, timeout=10).status_code == 403
    assert (
        requests.get(f"{api}/jobs/x1", headers=AUTH, timeout=10).status_code == 404
    )  # let in; no such job
    assert requests.get(f"{api}/jobs/x1", headers=OTHER, timeout=10).status_code == 404
    # Auth comes before the body is even looked at.
    assert requests.post(f"{api}/jobs", json={}, timeout=10).status_code == 401


def test_validation_errors_name_the_fields(api: str) -> None:
    bad = {"room": "lobby", "source": "ftp://host/a.wav", "sample_rate": 48000, "colour": "blue"}
    res = requests.post(f"{api}/jobs", json=bad, headers=AUTH, timeout=10)
    assert res.status_code == 422
    fields = {tuple(e["loc"][:2]) for e in res.json()["detail"]}
    assert {("body", "avatar_id"), ("body", "sample_rate"), ("body", "colour")} <= fields
    assert any(e["loc"][1] == "source" for e in res.json()["detail"])


@pytest.mark.parametrize("source", ["/etc/passwd", "file:///etc/passwd", "clips/hello.wav"])
def test_local_file_sources_are_refused(api: str, r: redis.Redis, source: str) -> None:
    res = requests.post(f"{api}/jobs", json={**JOB, "source": source}, headers=AUTH, timeout=10)
    assert res.status_code == 422
    [error] = res.json()["detail"]
    assert error["loc"] == ["body", "source"] and "worker's disk" in error["msg"]


def test_a_tts_request_the_engine_refuses_is_a_422_naming_the_source(api: str) -> None:
    # Refused before any request to the engine (no network): it was a 500.
    tts = {"type": "tts", "engine": "openai", "text": "<speak>hi</speak>", "ssml": True}
    res = requests.post(f"{api}/jobs", json={**JOB, "source": tts}, headers=AUTH, timeout=10)
    assert res.status_code == 422, res.text
    [error] = res.json()["detail"]
    assert error["loc"] == ["body", "source"] and error["type"] == "tts_rejected"
    assert "SSML" in error["msg"]


def test_body_over_the_cap_is_413(api: str) -> None:
    big = {**JOB, "metadata": {"pad": "x" * MAX_BODY}}
    res = requests.post(f"{api}/jobs", json=big, headers=AUTH, timeout=10)
    assert res.status_code == 413 and str(MAX_BODY) in res.json()["detail"]
    # Chunked (no Content-Length): counted as it arrives.
    chunks = iter([json.dumps(big).encode()])
    res = requests.post(f"{api}/jobs", data=chunks, headers=AUTH, timeout=10)
    assert res.status_code == 413


def test_post_is_idempotent_on_job_id(api: str, r: redis.Redis) -> None:
    job = {**JOB, "job_id": "api-idem-1"}
    first = requests.post(f"{api}/jobs", json=job, headers=AUTH, timeout=10)
    assert first.status_code == 201, first.text
    assert first.headers["Location"] == "/jobs/api-idem-1"
    assert first.json() == {"job_id": "api-idem-1", "celery_state": "PENDING", "status": "queued"}
    again = requests.post(f"{api}/jobs", json=job, headers=AUTH, timeout=10)
    assert again.status_code == 200 and again.json()["job_id"] == "api-idem-1"
    assert queued_job_ids(r).count("acme:api-idem-1") == 1  # namespaced per tenant
    # Without a job_id the server picks one: a new job each time.
    a = requests.post(f"{api}/jobs", json=JOB, headers=AUTH, timeout=10)
    b = requests.post(f"{api}/jobs", json=JOB, headers=AUTH, timeout=10)
    assert (a.status_code, b.status_code) == (201, 201)
    assert a.json()["job_id"] != b.json()["job_id"]


def test_status_and_cancel(api: str, r: redis.Redis) -> None:
    job = {**JOB, "job_id": "api-cancel-1"}
    assert requests.post(f"{api}/jobs", json=job, headers=AUTH, timeout=10).status_code == 201
    status = requests.get(f"{api}/jobs/api-cancel-1", headers=AUTH, timeout=10)
    assert status.status_code == 200 and status.json()["status"] == "queued"
    res = requests.delete(f"{api}/jobs/api-cancel-1", headers=AUTH, timeout=10)
    assert res.status_code == 202 and res.json() == {"job_id": "api-cancel-1", "was": "queued"}
    # An ended job reports its record, and cancelling it changes nothing.
    record = {"job_id": "acme:api-done-1", "status": "completed", "room": "acme:lobby"}
    r.set(job_record_key("acme:api-done-1"), json.dumps(record))
    shown = requests.get(f"{api}/jobs/api-done-1", headers=AUTH, timeout=10).json()
    assert shown == {**record, "job_id": "api-done-1", "room": "lobby"}  # the tenant's names
    res = requests.delete(f"{api}/jobs/api-done-1", headers=AUTH, timeout=10)
    assert res.json()["was"] == "ended"
    bad_id = requests.get(f"{api}/jobs/..%2Fx", headers=AUTH, timeout=10)
    assert bad_id.status_code in (404, 422)
    never = requests.get(f"{api}/jobs/never-enqueued-1", headers=AUTH, timeout=10)
    assert never.status_code == 404 and "never-enqueued-1" in never.text
    gone = requests.delete(f"{api}/jobs/never-enqueued-1", headers=AUTH, timeout=10)
    assert gone.status_code == 404


def test_sse_stream_ends_after_the_terminal_event(api: str, r: redis.Redis) -> None:
    key = job_events_key("acme:api-sse-1")
    for event, data in [("job.started", {}), ("job.progress", {"seconds_streamed": 1.0})]:
        fields = {"event": event, "job_id": "acme:api-sse-1", "ts": "1", "data": json.dumps(data)}
        r.xadd(key, fields)
    result = json.dumps({"job_id": "acme:api-sse-1", "status": "completed", "room": "acme:lobby"})
    fields = {"event": "job.completed", "job_id": "acme:api-sse-1", "ts": "2", "data": result}
    last = r.xadd(key, fields)
    url = f"{api}/jobs/api-sse-1/events"
    with requests.get(url, headers=AUTH, stream=True, timeout=30) as res:
        assert res.headers["content-type"].startswith("text/event-stream")
        frames = sse_frames(res)
    assert [f["event"] for f in frames] == ["job.started", "job.progress", "job.completed"]
    assert frames[1]["data"]["data"] == {"seconds_streamed": 1.0}
    assert frames[-1]["id"] == last.decode()
    # The tenant sees its own job ids.
    assert {f["data"]["job_id"] for f in frames} == {"api-sse-1"}
    assert frames[-1]["data"]["data"]["job_id"] == "api-sse-1"
    assert frames[-1]["data"]["data"]["room"] == "lobby"
    # Resuming after the second event sends only the rest.
    resume = {**AUTH, "Last-Event-ID": frames[1]["id"]}
    with requests.get(url, headers=resume, stream=True, timeout=30) as res:
        assert [f["event"] for f in sse_frames(res)] == ["job.completed"]
    # Bounded: a job with no events closes after `timeout` seconds.
    job = {**JOB, "job_id": "api-sse-none"}
    assert requests.post(f"{api}/jobs", json=job, headers=AUTH, timeout=10).status_code == 201
    with requests.get(f"{api}/jobs/api-sse-none/events?timeout=1", headers=AUTH, timeout=30) as res:
        assert res.status_code == 200 and sse_frames(res) == []


def test_security_headers_on_every_response(api: str) -> None:
    responses = [
        requests.get(f"{api}/jobs/x1", timeout=10),  # 401
        requests.get(f"{api}/jobs/x1", headers=AUTH, timeout=10),  # 404
        requests.post(f"{api}/jobs", data=b"x" * (MAX_BODY + 1), headers=AUTH, timeout=10),  # 413
        requests.get(f"{api}/openapi.json", timeout=10),
        requests.get(api, allow_redirects=False, timeout=10),  # the redirect to the console
        requests.get(f"{api}/console/", timeout=10),
        requests.get(f"{api}/console/api/overview", headers=AUTH, timeout=10),
    ]
    statuses = [res.status_code for res in responses]
    assert statuses[:5] == [401, 404, 413, 200, 307], statuses
    for res in responses:
        csp = {
            d.split()[0]: d.split()[1:] for d in res.headers["Content-Security-Policy"].split("; ")
        }
        assert csp["script-src"] == ["'self'"] and csp["frame-ancestors"] == ["'none'"]
        assert csp["object-src"] == ["'none'"] and csp["default-src"] == ["'self'"]
        assert res.headers["X-Frame-Options"] == "DENY"
        assert res.headers["X-Content-Type-Options"] == "nosniff"
        assert res.headers["Referrer-Policy"] == "no-referrer"
    # No Swagger / ReDoc pages: they need inline and third-party scripts.
    assert requests.get(f"{api}/docs", timeout=10).status_code == 404


def test_openapi_document(api: str) -> None:
    doc = requests.get(f"{api}/openapi.json", timeout=10).json()
    assert {"/jobs", "/jobs/{job_id}", "/jobs/{job_id}/events"} <= set(doc["paths"])
    assert {"post"} <= set(doc["paths"]["/jobs"]) and "delete" in doc["paths"]["/jobs/{job_id}"]
    assert {"HTTPBearer", "APIKeyHeader"} <= set(doc["components"]["securitySchemes"])
    assert "room" in doc["components"]["schemas"]["Job"]["properties"]


# --- tenants ---------------------------------------------------------------------------------


def test_tenants_cannot_see_or_touch_each_others_jobs(api: str, r: redis.Redis) -> None:
    job = {**JOB, "job_id": "api-tenant-1"}
    assert requests.post(f"{api}/jobs", json=job, headers=AUTH, timeout=10).status_code == 201
    url = f"{api}/jobs/api-tenant-1"
    assert requests.get(url, headers=OTHER, timeout=10).status_code == 404
    assert requests.delete(url, headers=OTHER, timeout=10).status_code == 404
    assert requests.get(f"{url}/events?timeout=1", headers=OTHER, timeout=10).status_code == 404
    # The same job_id from the other tenant is a job of its own; the first is untouched.
    theirs = requests.post(f"{api}/jobs", json=job, headers=OTHER, timeout=10)
    assert theirs.status_code == 201 and theirs.json()["job_id"] == "api-tenant-1"
    mine = requests.get(url, headers=AUTH, timeout=10).json()
    assert mine["status"] == "queued" and "cancel_requested" not in mine
    ids = queued_job_ids(r)
    assert ids.count("acme:api-tenant-1") == 1 and ids.count("globex:api-tenant-1") == 1


def test_a_tenants_rooms_are_its_own(api: str, r: redis.Redis, redis_server: str) -> None:
    # Both tenants play into what each calls `lobby`: two LiveKit rooms, two lanes.
    for headers in (AUTH, OTHER):
        job = {**JOB, "job_id": "api-room-1"}
        created = requests.post(f"{api}/jobs", json=job, headers=headers, timeout=10)
        assert created.status_code == 201, created.text
    rooms = queued_rooms(r)
    assert (rooms["acme:api-room-1"], rooms["globex:api-room-1"]) == ("acme:lobby", "globex:lobby")
    ledger = ledger_for(Settings(REDIS_URL=redis_server.rsplit("/", 1)[0] + "/3"))
    assert ledger.room_order("globex:lobby", 100).count("acme:api-room-1") == 0
    assert "acme:api-room-1" in ledger.room_order("acme:lobby", 100)
    # No name reaches another tenant's room: the separator is refused, not passed through.
    for room in ("globex:lobby", "acme:lobby", ":lobby", "x" * 124):
        job = {**JOB, "job_id": "api-room-forged", "room": room}
        refused = requests.post(f"{api}/jobs", json=job, headers=AUTH, timeout=10)
        assert refused.status_code == 422, (room, refused.text)
        assert refused.json()["detail"][0]["loc"] == ["body", "room"]
    assert "acme:api-room-forged" not in queued_rooms(r)
    # The longest room a tenant may name still fits LiveKit's (and the ledger's) 128.
    longest = {**JOB, "job_id": "api-room-long", "room": "x" * (128 - len("acme:"))}
    assert requests.post(f"{api}/jobs", json=longest, headers=AUTH, timeout=10).status_code == 201


def test_without_tenants_room_names_are_kept(
    redis_server: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    url = own_db(redis_server, 12)
    env = {"REDIS_URL": url, "AVATARQ_API_KEYS": "solo-key"}
    proc, base = start_api(env, tmp_path_factory.mktemp("solo-api"))
    solo = {"X-API-Key": "solo-key"}
    with proc:
        for room in ("lobby", "team:lobby"):
            job = {**JOB, "job_id": f"solo-{room}", "room": room}
            created = requests.post(f"{base}/jobs", json=job, headers=solo, timeout=10)
            assert created.status_code == 201, created.text
        token = requests.post(
            f"{base}/console/api/viewer-token",
            json={"room": "team:lobby"},
            headers=solo,
            timeout=10,
        )
        assert token.status_code == 200 and token.json()["room"] == "team:lobby"
    rooms = queued_rooms(redis.Redis.from_url(url))
    assert rooms == {"default:solo-lobby": "lobby", "default:solo-team:lobby": "team:lobby"}


def test_api_keys_setting() -> None:
    from producers.api import parse_api_keys

    assert parse_api_keys("acme:k1, acme:k2,globex:k3") == {
        "k1": "acme",
        "k2": "acme",
        "k3": "globex",
    }
    assert parse_api_keys("only-key") == {"only-key": "default"}
    with pytest.raises(ValueError, match="2 keys without a tenant") as info:
        parse_api_keys("secret-one,secret-two")
    assert "secret" not in str(info.value)
    with pytest.raises(ValueError, match="entry 2: write it as tenant:key") as info:
        parse_api_keys("acme:k1,bad tenant:secret-x")
    assert "secret" not in str(info.value)


def test_api_refuses_to_start_with_unscoped_keys() -> None:
    proc = avatarq("api", env={"AVATARQ_API_KEYS": "secret-one,secret-two"}, timeout=60)
    assert proc.returncode == 2
    assert "without a tenant" in proc.stderr and "secret" not in proc.stderr + proc.stdout


# --- clear errors: 422 for bad jobs, 503 when Redis is down ----------------------------------


def test_private_source_and_webhook_are_422(api: str) -> None:
    # Default settings in the API process: no private sources, no private webhooks.
    for change, field in [
        ({"source": "http://10.0.0.8/internal.wav"}, "source"),
        ({"webhook_url": "http://127.0.0.1:9/hook"}, "webhook_url"),
    ]:
        res = requests.post(f"{api}/jobs", json={**JOB, **change}, headers=AUTH, timeout=10)
        assert res.status_code == 422, res.text
        [error] = res.json()["detail"]
        assert error["loc"] == ["body", field] and "private address" in error["msg"]


@pytest.mark.parametrize(
    ("body", "field", "words"),
    [
        ('"max_duration": NaN', "max_duration", "finite number"),
        ('"max_duration": 1e999', "max_duration", "finite number"),
        ('"max_duration": 3601', "max_duration", "AVATARQ_MAX_JOB_DURATION limit of 3600s"),
        ('"lead": Infinity', "lead", "finite number"),
        ('"metadata": {"x": NaN}', "metadata", "JSON"),
    ],
)
def test_non_finite_and_oversized_numbers_are_422(
    api: str, body: str, field: str, words: str
) -> None:
    raw = json.dumps(JOB)[:-1] + ", " + body + "}"
    headers = {**AUTH, "Content-Type": "application/json"}
    res = requests.post(f"{api}/jobs", data=raw, headers=headers, timeout=10)
    assert res.status_code == 422, res.text
    [error] = [e for e in res.json()["detail"] if e["loc"][:2] == ["body", field]]
    assert words in error["msg"]


def test_redis_down_is_503(tmp_path: Path) -> None:
    with refused_port() as port:
        proc, base = start_api({"REDIS_URL": f"redis://127.0.0.1:{port}/0"}, tmp_path)
        with proc:
            for method, path in [("post", "/jobs"), ("get", "/jobs/x"), ("get", "/jobs/x/events")]:
                res = requests.request(method, base + path, json=JOB, headers=AUTH, timeout=30)
                assert res.status_code == 503, (path, res.text)
                assert "unreachable" in res.json()["detail"] and res.headers["Retry-After"]


# --- events stream -------------------------------------------------------------------------


def test_sse_unknown_job_and_bad_last_event_id(api: str, r: redis.Redis) -> None:
    res = requests.get(f"{api}/jobs/api-sse-unknown/events?timeout=1", headers=AUTH, timeout=10)
    assert res.status_code == 404 and "api-sse-unknown" in res.json()["detail"]
    key = job_events_key("acme:api-sse-2")
    r.xadd(key, {"event": "job.completed", "job_id": "acme:api-sse-2", "ts": "1", "data": "{}"})
    garbage = {**AUTH, "Last-Event-ID": "not-an-id"}
    res = requests.get(f"{api}/jobs/api-sse-2/events", headers=garbage, timeout=10)
    assert res.status_code == 400 and "Last-Event-ID" in res.json()["detail"]


@pytest.mark.slow
def test_sse_stream_outlives_silence_with_keep_alives(api: str) -> None:
    """A queued job with no events for longer than redis-py's 5 s socket timeout: the stream
    stays up, sends keep-alive comments, and closes cleanly at `timeout`."""
    job = {**JOB, "job_id": "api-sse-quiet"}
    assert requests.post(f"{api}/jobs", json=job, headers=AUTH, timeout=10).status_code == 201
    url = f"{api}/jobs/api-sse-quiet/events?timeout=12"
    started = time.monotonic()
    with requests.get(url, headers=AUTH, stream=True, timeout=30) as res:
        lines = list(res.iter_lines(decode_unicode=True))  # raises if the stream breaks
    assert time.monotonic() - started >= 11.5
    comments = [line for line in lines if line.startswith(":")]
    assert len(comments) >= 2 and not [line for line in lines if line.startswith("data")]
