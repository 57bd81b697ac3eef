"""HTTP API for producers in any language: enqueue, follow and cancel jobs, stream their events.

`avatarq api --host 0.0.0.0 --port 8000` serves it with uvicorn; the OpenAPI document is at
`/openapi.json`. Every `/jobs` route needs a key from `AVATARQ_API_KEYS`, sent as
`Authorization: Bearer KEY` or `X-API-Key: KEY` (401 when missing, 403 when wrong).
"""

from __future__ import annotations

import asyncio
import hmac
import json
from collections.abc import AsyncIterator
from typing import Annotated, Any, cast
from urllib.parse import urlsplit

import redis.asyncio as aioredis
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Path, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from avatarq.events import Event, Status, job_events_key, job_record_key
from avatarq.settings import Settings, get_settings
from producers.client import cancel, enqueue, get_status
from producers.console import mount_console
from producers.jobs import JOB_ID_PATTERN, Job

#: Events after which a job's stream has nothing more to say.
TERMINAL_EVENTS = frozenset({Event.COMPLETED, Event.FAILED, Event.CANCELLED, Event.UNCONFIRMED})
#: An SSE comment is sent this often while no event comes, so proxies keep the connection.
HEARTBEAT_S = 15.0
#: Longest an events request may stay open (the client reconnects with Last-Event-ID).
MAX_STREAM_S = 3600.0

#: XREAD's reply: [(stream key, [(entry id, {field: value})])].
StreamReply = list[tuple[bytes, list[tuple[bytes, dict[bytes, bytes]]]]]

JobId = Annotated[str, Path(pattern=JOB_ID_PATTERN, description="The job's id")]


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


def _key_checker(keys: list[str]) -> Any:
    def require_key(credentials: Bearer, api_key: ApiKeyHeader) -> None:
        given = credentials.credentials if credentials else api_key
        if not given:
            raise HTTPException(
                401,
                "missing API key: send `Authorization: Bearer KEY` or `X-API-Key: KEY`",
                headers={"WWW-Authenticate": "Bearer"},
            )
        # Compare against every key in constant time, so timing tells nothing about them.
        if not any(hmac.compare_digest(given.encode(), k.encode()) for k in keys):
            raise HTTPException(403, "invalid API key")

    return require_key


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


def _event_frame(entry_id: bytes, fields: dict[bytes, bytes]) -> tuple[str, str]:
    """One SSE frame for a stream entry, and its event name."""
    event = fields.get(b"event", b"message").decode()
    body = {k.decode(): v.decode() for k, v in fields.items()}
    if "data" in body:
        body["data"] = json.loads(body["data"])
    return f"id: {entry_id.decode()}\nevent: {event}\ndata: {json.dumps(body)}\n\n", event


async def _job_events(
    request: Request, s: Settings, job_id: str, after: str, timeout: float
) -> AsyncIterator[str]:
    """Stream entries of `avatarq:events:{job_id}` after `after`, ending after a terminal event,
    when the job has ended and nothing more comes, or after `timeout` seconds."""
    client = aioredis.Redis.from_url(s.redis_url)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    try:
        while (left := deadline - loop.time()) > 0 and not await request.is_disconnected():
            block_ms = max(1, int(min(HEARTBEAT_S, left) * 1000))
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
                frame, event = _event_frame(entry_id, fields)
                yield frame
                if event in TERMINAL_EVENTS:
                    return
    finally:
        await client.aclose()


def create_app(settings: Settings | None = None) -> FastAPI:
    s = settings or get_settings()
    keys = [k.strip() for k in s.api_keys.get_secret_value().split(",") if k.strip()]
    if not keys:
        raise RuntimeError("set AVATARQ_API_KEYS (comma-separated) before serving the HTTP API")

    app = FastAPI(
        title="avatarq",
        summary="Enqueue avatar audio jobs, follow them, cancel them, stream their events.",
        version="1",
    )
    app.add_middleware(BodyLimit, max_bytes=s.api_max_body_bytes)
    jobs = APIRouter(prefix="/jobs", tags=["jobs"], dependencies=[Depends(_key_checker(keys))])

    @jobs.post(
        "",
        status_code=201,
        responses={200: {"description": "A job with this job_id existed: returned as is"}},
    )
    def create_job(job: Job, response: Response) -> dict[str, Any]:
        """Enqueue a job. Idempotent on `job_id`: sending it again returns the existing job
        (200) instead of a new one (201). `source` must be an http(s):// or s3:// URL (or a
        `tts` object)."""
        _refuse_local_source(job)
        handle = enqueue(job, settings=s)
        if not handle.created:
            response.status_code = 200
        response.headers["Location"] = f"/jobs/{handle.job_id}"
        return get_status(handle.job_id, settings=s)

    @jobs.get("/{job_id}")
    def job_status(job_id: JobId) -> dict[str, Any]:
        """The job's final result if it ended, else `queued` or `playing` with progress;
        404 for a job id that was never enqueued."""
        status = get_status(job_id, settings=s)
        if status["status"] == Status.UNKNOWN:
            raise HTTPException(404, f"no job {job_id}")
        return status

    @jobs.delete("/{job_id}", status_code=202)
    def cancel_job(job_id: JobId) -> dict[str, Any]:
        """Cancel a job: a queued one is dropped, a playing one stops within half a second.
        `was` tells what it was doing; `ended` means too late, nothing changed."""
        return {"job_id": job_id, "was": cancel(job_id, settings=s)}

    @jobs.get(
        "/{job_id}/events",
        response_class=StreamingResponse,
        responses={200: {"content": {"text/event-stream": {}}}},
    )
    async def job_events(
        request: Request,
        job_id: JobId,
        timeout: Annotated[
            float, Query(gt=0, le=MAX_STREAM_S, description="Close after this many seconds")
        ] = MAX_STREAM_S,
    ) -> StreamingResponse:
        """Server-sent events of the job (`job.started`, `job.progress`, …) from its start,
        or after `Last-Event-ID`; the stream ends after `job.completed`, `job.failed` or
        `job.cancelled`."""
        after = request.headers.get("last-event-id") or "0-0"
        return StreamingResponse(
            _job_events(request, s, job_id, after, timeout),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    app.include_router(jobs)
    mount_console(app, _key_checker(keys), s)
    return app
