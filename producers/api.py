"""HTTP API for producers in any language: enqueue, follow and cancel jobs, stream their events.

`avatarq api` serves it with uvicorn; every `/jobs` route needs a key from `AVATARQ_API_KEYS`.
A key's tenant namespaces job ids and rooms (`{tenant}:welcome-42` in `{tenant}:lobby`), so a
tenant can neither see nor touch another's jobs (docs/tenants.md, docs/usage.md)."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import re
from collections.abc import AsyncIterator
from typing import Annotated, Any, cast
from urllib.parse import urlsplit

import redis.asyncio as aioredis
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Path, Query, Request, Response
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from kombu.exceptions import OperationalError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from avatarq.errors import JobError
from avatarq.events import TERMINAL_EVENTS, Status
from avatarq.jobs import JOB_ID_PATTERN, Job, parse_job
from avatarq.ledger.keys import job_enqueued_key, job_events_key, job_record_key
from avatarq.settings import Settings, get_settings
from producers.client import FIELD_OF_REASON, cancel, enqueue, get_status
from producers.console import mount_console
from producers.headers import SecurityHeaders

log = logging.getLogger("avatarq.api")

#: Events after which a job's stream has nothing more to say.
#: An SSE comment is sent this often while no event comes, so proxies keep the connection.
HEARTBEAT_S = 10.0
#: The events stream's Redis socket timeout: longer than a blocking XREAD of HEARTBEAT_S
#: (redis-py's default of 5 s would cut every quiet stream after 5 s).
STREAM_SOCKET_TIMEOUT_S = HEARTBEAT_S + 10
#: Longest an events request may stay open (the client reconnects with Last-Event-ID).
MAX_STREAM_S = 3600.0

#: XREAD's reply: [(stream key, [(entry id, {field: value})])].
StreamReply = list[tuple[bytes, list[tuple[bytes, dict[bytes, bytes]]]]]

JobId = Annotated[str, Path(pattern=JOB_ID_PATTERN, description="The job's id")]
#: Tenant names: the `tenant` of `tenant:key` entries in AVATARQ_API_KEYS.
TENANT_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,31}$")
#: The tenant of a key given without one (at most one such key).
DEFAULT_TENANT = "default"
#: The longest room name (avatarq.settings.NAME_PATTERN), a tenant's prefix included.
ROOM_MAX = 128
#: Redis stream entry ids, as SSE clients send them back in Last-Event-ID.
STREAM_ID = re.compile(r"^\d{1,20}(-\d{1,20})?$")
#: Errors meaning Redis (results, ledger) or the broker cannot be reached: 503.
UNAVAILABLE = (RedisConnectionError, RedisTimeoutError, OperationalError)


def parse_api_keys(value: str) -> dict[str, str]:
    """AVATARQ_API_KEYS (`tenant:key` entries, comma-separated) as {key: tenant}.

    A tenant may have several keys (rotation). One key may go without a tenant (it is the
    `default` tenant's), as in a single-client setup; several would silently share one job
    namespace, so that is refused. Errors name entries by position, never by key.
    """
    keys: dict[str, str] = {}
    bare = 0
    for n, entry in enumerate((e.strip() for e in value.split(",")), start=1):
        if not entry:
            continue
        tenant, sep, key = entry.partition(":")
        if not sep:
            tenant, key, bare = DEFAULT_TENANT, entry, bare + 1
        if not TENANT_PATTERN.match(tenant) or not key:
            raise ValueError(
                f"AVATARQ_API_KEYS entry {n}: write it as tenant:key (tenant: letters, digits, "
                "_ and -, at most 32)"
            )
        keys[key] = tenant
    if bare > 1:
        raise ValueError(
            f"AVATARQ_API_KEYS has {bare} keys without a tenant; write them as tenant:key so "
            "each client gets its own job namespace"
        )
    if not keys:
        raise ValueError("set AVATARQ_API_KEYS (comma-separated tenant:key entries)")
    return keys


class BodyLimit:
    """Refuse request bodies over `max_bytes` with 413, before anything parses them.

    Checks Content-Length, then counts what actually arrives (a chunked body has none).
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            await self._too_large(scope, receive, send)
            return
        buffered: list[Message] = []
        size, more = 0, True
        while more:
            message = await receive()
            buffered.append(message)
            if message["type"] != "http.request":
                break
            size += len(message.get("body", b""))
            more = message.get("more_body", False)
            if size > self.max_bytes:
                await self._too_large(scope, receive, send)
                return

        async def replay() -> Message:
            return buffered.pop(0) if buffered else await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        detail = f"request body is over the {self.max_bytes}-byte limit"
        await JSONResponse({"detail": detail}, status_code=413)(scope, receive, send)


# Module level: FastAPI resolves these annotations by name, which a closure's locals defeat.
Bearer = Annotated[
    HTTPAuthorizationCredentials | None,
    Depends(HTTPBearer(auto_error=False, description="Authorization: Bearer KEY")),
]
ApiKeyHeader = Annotated[
    str | None,
    Depends(APIKeyHeader(name="X-API-Key", auto_error=False, description="X-API-Key: KEY")),
]


def rooms_namespaced(keys: dict[str, str]) -> bool:
    """Whether tenants' rooms are their own (`{tenant}:{room}` in LiveKit): unless every key is
    the `default` tenant's, where the API has one client and room names stay as given."""
    return set(keys.values()) != {DEFAULT_TENANT}


def _invalid(field: str, message: str) -> RequestValidationError:
    return RequestValidationError([{"loc": ("body", field), "msg": message, "type": "value_error"}])


class TenantIds:
    """A tenant's view of job ids and rooms: theirs (`welcome-42`, `lobby`) and the queue's and
    LiveKit's (`acme:welcome-42`, `acme:lobby`; the room as given when rooms are not namespaced).
    """

    def __init__(self, tenant: str, own_rooms: bool = True) -> None:
        self.prefix = f"{tenant}:"
        self.room_prefix = self.prefix if own_rooms else ""

    def internal(self, job_id: str) -> str:
        return self.prefix + job_id

    def livekit_room(self, room: str) -> str:
        """The LiveKit room of the tenant's `room`. A tenant's room name may not hold the
        separator, so every room of a tenant's has exactly one and `acme:x:y` names none."""
        if not self.room_prefix:
            return room
        if ":" in room:
            raise _invalid("room", "room may not contain ':' (it separates tenant and room)")
        if len(self.room_prefix + room) > ROOM_MAX:
            raise _invalid("room", f"room is at most {ROOM_MAX - len(self.room_prefix)} characters")
        return self.room_prefix + room

    def owns_room(self, livekit_room: str) -> bool:
        """Whether `livekit_room` is one this tenant can name (`livekit_room` of some room)."""
        if not self.room_prefix:
            return True
        own = livekit_room.removeprefix(self.room_prefix)
        return own != livekit_room and ":" not in own

    def public_room(self, livekit_room: str) -> str:
        return livekit_room.removeprefix(self.room_prefix)

    def public(self, record: dict[str, Any]) -> dict[str, Any]:
        """`record` (a status, a result, an event's fields) with the tenant's own job id and
        room."""
        job_id, room = record.get("job_id"), record.get("room")
        if isinstance(job_id, str) and job_id.startswith(self.prefix):
            record = {**record, "job_id": job_id.removeprefix(self.prefix)}
        if isinstance(room, str) and self.owns_room(room):
            record = {**record, "room": self.public_room(room)}
        return record


def require_tenant(request: Request, credentials: Bearer, api_key: ApiKeyHeader) -> TenantIds:
    """The tenant of the request's API key (`app.state.api_keys`: {key: tenant})."""
    given = credentials.credentials if credentials else api_key
    if not given:
        raise HTTPException(
            401,
            "missing API key: send `Authorization: Bearer KEY` or `X-API-Key: KEY`",
            headers={"WWW-Authenticate": "Bearer"},
        )
    # Compare against every key in constant time, so timing tells nothing about them.
    tenant = None
    for key, owner in request.app.state.api_keys.items():
        if hmac.compare_digest(given.encode(), key.encode()):
            tenant = owner
    if tenant is None:
        raise HTTPException(403, "invalid API key")
    return TenantIds(tenant, own_rooms=request.app.state.own_rooms)


Tenant = Annotated[TenantIds, Depends(require_tenant)]


def _refuse_local_source(job: Job) -> None:
    """Remote producers must not make a worker read its own disk."""
    if not isinstance(job.source, str):
        return  # a tts source: rendered here, then stored where workers read it
    scheme = urlsplit(job.source).scheme.lower()
    if scheme == "file" or len(scheme) <= 1:  # file://, a bare path, a Windows drive letter
        message = (
            "local file sources are refused by the HTTP API (a remote producer must not read "
            "the worker's disk): use an http(s):// or s3:// URL"
        )
        raise RequestValidationError(
            [{"loc": ("body", "source"), "msg": message, "type": "value_error"}]
        )


def _event_frame(entry_id: bytes, fields: dict[bytes, bytes], scope: TenantIds) -> tuple[str, str]:
    """One SSE frame for a stream entry, and its event name."""
    event = fields.get(b"event", b"message").decode()
    body: dict[str, Any] = {k.decode(): v.decode() for k, v in fields.items()}
    if "data" in body:
        data = json.loads(body["data"])
        body["data"] = scope.public(data) if isinstance(data, dict) else data
    body = scope.public(body)
    return f"id: {entry_id.decode()}\nevent: {event}\ndata: {json.dumps(body)}\n\n", event


def _events_client(s: Settings) -> aioredis.Redis:
    return aioredis.Redis.from_url(s.redis_url, socket_timeout=STREAM_SOCKET_TIMEOUT_S)


async def _job_events(
    request: Request,
    client: aioredis.Redis,
    job_id: str,
    after: str,
    timeout: float,
    scope: TenantIds,
) -> AsyncIterator[str]:
    """Stream entries of `avatarq:events:{job_id}` after `after`, ending after a terminal event,
    when the job has ended and nothing more comes, or after `timeout` seconds. A comment goes
    out first and then whenever HEARTBEAT_S pass without an event."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    # A socket timeout in REDIS_URL wins over ours: never block as long as it.
    socket_timeout = client.connection_pool.connection_kwargs.get("socket_timeout")
    longest = min(HEARTBEAT_S, socket_timeout / 2) if socket_timeout else HEARTBEAT_S
    try:
        yield ": connected\n\n"
        while (left := deadline - loop.time()) > 0 and not await request.is_disconnected():
            block_ms = max(1, int(min(longest, left) * 1000))
            # redis-py types every protocol's reply shape; RESP2 (the default) is StreamReply.
            found = cast(
                StreamReply,
                await client.xread({job_events_key(job_id): after}, block=block_ms, count=100),
            )
            if not found:
                # Its terminal event may be gone (trimmed, expired) while its record remains.
                if await client.exists(job_record_key(job_id)):
                    return
                yield ": keep-alive\n\n"
                continue
            for entry_id, fields in found[0][1]:
                after = entry_id.decode()
                frame, event = _event_frame(entry_id, fields, scope)
                yield frame
                if event in TERMINAL_EVENTS:
                    return
    except RedisError as e:
        # Headers are sent: end the stream; the client resumes with Last-Event-ID.
        log.warning("events of job %s: Redis failed, stream closed: %s", job_id, e)
    finally:
        await client.aclose()


def _finite(value: Any) -> Any:
    """`value` with NaN and infinities as strings: JSON has no such numbers, and echoing them
    back in a 422 must not fail the response itself."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        detail = _finite(jsonable_encoder(exc.errors()))
        return JSONResponse({"detail": detail}, status_code=422)

    @app.exception_handler(JobError)
    async def job_error(request: Request, exc: JobError) -> JSONResponse:
        # Raised while enqueueing: the SSRF policy, or the TTS engine or its audio store.
        if not exc.permanent:
            log.warning("%s %s: could not enqueue now: %s", request.method, request.url.path, exc)
            detail = f"the job could not be enqueued now, try again later: {exc.message}"
            return JSONResponse({"detail": detail}, status_code=503, headers={"Retry-After": "5"})
        field = FIELD_OF_REASON.get(exc.reason)
        loc = ["body", field] if field else ["body"]
        error = {"loc": loc, "msg": exc.message, "type": exc.reason}
        return JSONResponse({"detail": [error]}, status_code=422)

    for kind in UNAVAILABLE:

        @app.exception_handler(kind)
        async def unavailable(request: Request, exc: Exception) -> JSONResponse:
            log.warning("%s %s: queue unavailable: %s", request.method, request.url.path, exc)
            detail = f"the job queue (Redis / the broker) is unreachable, try again later: {exc}"
            return JSONResponse({"detail": detail}, status_code=503, headers={"Retry-After": "5"})


def create_app(settings: Settings | None = None) -> FastAPI:
    s = settings or get_settings()
    try:
        keys = parse_api_keys(s.api_keys.get_secret_value())
    except ValueError as e:
        raise RuntimeError(str(e)) from None

    # No Swagger or ReDoc page: they run inline and CDN scripts, which the console's origin
    # refuses (producers/headers.py); the OpenAPI document stays at /openapi.json.
    app = FastAPI(
        title="avatarq",
        summary="Enqueue avatar audio jobs, follow them, cancel them, stream their events.",
        version="1",
        docs_url=None,
        redoc_url=None,
    )
    app.add_middleware(BodyLimit, max_bytes=s.api_max_body_bytes)
    # Added last, so outermost: the body limit's 413 gets the headers too.
    app.add_middleware(SecurityHeaders, livekit_url=s.livekit_public_url or s.livekit_url)
    _install_error_handlers(app)
    app.state.api_keys = keys
    app.state.own_rooms = rooms_namespaced(keys)
    jobs = APIRouter(prefix="/jobs", tags=["jobs"])

    def known_status(job_id: str, scope: TenantIds) -> dict[str, Any]:
        status = get_status(scope.internal(job_id), settings=s)
        if status["status"] == Status.UNKNOWN:
            raise HTTPException(404, f"no job {job_id}")
        return scope.public(status)

    @jobs.post(
        "",
        status_code=201,
        responses={200: {"description": "A job with this job_id existed: returned as is"}},
    )
    def create_job(job: Job, response: Response, scope: Tenant) -> dict[str, Any]:
        """Enqueue a job. Idempotent on `job_id` (per tenant): sending it again returns the
        existing job (200) instead of a new one (201). `source` must be an http(s):// or
        s3:// URL (or a `tts` object)."""
        _refuse_local_source(job)
        internal = scope.internal(job.job_id)
        if len(internal) > 128:
            raise _invalid("job_id", f"job_id is at most {128 - len(scope.prefix)} characters")
        named = {**job.payload(), "job_id": internal, "room": scope.livekit_room(job.room)}
        handle = enqueue(parse_job(named, s), settings=s)
        if not handle.created:
            response.status_code = 200
        response.headers["Location"] = f"/jobs/{job.job_id}"
        return scope.public(get_status(handle.job_id, settings=s))

    @jobs.get("/{job_id}")
    def job_status(job_id: JobId, scope: Tenant) -> dict[str, Any]:
        """The job's final result if it ended, else `queued` or `playing` with progress;
        404 for a job id this tenant never enqueued."""
        return known_status(job_id, scope)

    @jobs.delete("/{job_id}", status_code=202)
    def cancel_job(job_id: JobId, scope: Tenant) -> dict[str, Any]:
        """Cancel a job: a queued one is dropped, a playing one stops within half a second.
        `was` tells what it was doing; `ended` means too late, nothing changed. 404 for a job
        id this tenant never enqueued."""
        known_status(job_id, scope)
        return {"job_id": job_id, "was": cancel(scope.internal(job_id), settings=s)}

    @jobs.get(
        "/{job_id}/events",
        response_class=StreamingResponse,
        responses={200: {"content": {"text/event-stream": {}}}},
    )
    async def job_events(
        request: Request,
        job_id: JobId,
        scope: Tenant,
        timeout: Annotated[
            float, Query(gt=0, le=MAX_STREAM_S, description="Close after this many seconds")
        ] = MAX_STREAM_S,
    ) -> StreamingResponse:
        """Server-sent events of the job (`job.started`, `job.progress`, …) from its start,
        or after `Last-Event-ID`; the stream ends after `job.completed`, `job.failed` or
        `job.cancelled`. A comment (`: keep-alive`) comes every 10 s without events. 404 for
        a job id this tenant never enqueued, 400 for a malformed `Last-Event-ID`."""
        after = request.headers.get("last-event-id", "").strip() or "0-0"
        if not STREAM_ID.match(after):
            raise HTTPException(
                400, f"Last-Event-ID must be an event id such as 1700000000000-0, got {after!r:.80}"
            )
        internal = scope.internal(job_id)
        client = _events_client(s)
        try:
            keys = (job_events_key(internal), job_record_key(internal), job_enqueued_key(internal))
            known = await client.exists(*keys)
        except BaseException:
            await client.aclose()
            raise
        if not known:
            await client.aclose()
            raise HTTPException(404, f"no job {job_id}")
        return StreamingResponse(
            _job_events(request, client, internal, after, timeout, scope),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    app.include_router(jobs)
    mount_console(app, require_tenant, s)
    return app
