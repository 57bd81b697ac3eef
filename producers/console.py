"""The operator console: a page served at `/console/` and the JSON it reads.

The page is the built front end (package data; without a build `/console/` answers 503 saying
how to build it). It holds no data: it reads the producer functions' answers, never worker
internals, behind the same API keys as `/jobs` (docs/usage.md)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from fastapi import APIRouter, Depends, FastAPI, HTTPException
from fastapi.responses import FileResponse, PlainTextResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field

from avatarq.events import TERMINAL_EVENTS, Status
from avatarq.jobs import NAME_PATTERN
from avatarq.ledger.producer import ProducerLedger
from avatarq.settings import Settings
from producers.client import avatar_capacity, get_status, ledger_for, redis_client
from producers.deadletter import list_dead, retry_dead

log = logging.getLogger("avatarq.console")

#: Where `npm run build` in console/ writes the page (see console/vite.config.ts).
CONSOLE_DIST = Path(__file__).resolve().parent / "console_dist"
BUILD_HINT = "cd console && npm ci && npm run build (`make test` does it when npm exists)"
#: Bounds on what one overview reads, so a huge backlog cannot make the page slow to answer.
MAX_ROOMS = 100
MAX_JOBS_PER_ROOM = 50
RECENT_ENDED = 20
EVENTS_SCANNED = 2000
DEAD_SHOWN = 50
#: A viewer token outlives a long announcement; the page asks for a new one per watch.
VIEWER_TTL_S = 2 * 3600
#: What the console shows of an ended job's result (its terminal event's data).
ENDED_FIELDS = (
    "status",
    "room",
    "avatar_id",
    "reason",
    "error",
    "cancelled_while",
    "audio_duration",
)


class WatchRequest(BaseModel):
    room: str = Field(pattern=NAME_PATTERN, description="The room to watch, as the tenant names it")


class ViewerToken(BaseModel):
    url: str = Field(description="LiveKit server URL to connect to")
    token: str = Field(description="Subscribe-only access token for `room`")
    room: str
    identity: str


class TenantScope(Protocol):
    """A tenant's view of job ids and rooms (producers/api.py's `TenantIds`): the console shows
    a key's tenant only its own jobs and rooms, under their own names, as the `/jobs` routes do."""

    prefix: str

    def internal(self, job_id: str) -> str: ...

    def livekit_room(self, room: str) -> str: ...

    def owns_room(self, livekit_room: str) -> bool: ...

    def public_room(self, livekit_room: str) -> str: ...

    def public(self, record: dict[str, Any]) -> dict[str, Any]: ...


def _text(value: bytes | str | None) -> str:
    return value.decode() if isinstance(value, bytes) else (value or "")


def _queued_job(ledger: ProducerLedger, job_id: str, settings: Settings) -> dict[str, Any]:
    """A job in a room's order: its live status plus what was asked (avatar, source)."""
    status = get_status(job_id, settings=settings)
    if status["status"] == Status.PLAYING and not ledger.leased(job_id):
        # A worker holds it but waits for its turn in the room (only the head has a lease).
        status["status"] = Status.QUEUED.value
    job = ledger.enqueued_job(job_id) or {}
    source = job.get("source")
    tts = (job.get("metadata") or {}).get("tts")
    status.setdefault("avatar_id", job.get("avatar_id"))
    status["source"] = f"tts: {tts.get('preview')}" if isinstance(tts, dict) else source
    return status


def rooms(settings: Settings, scope: TenantScope) -> list[dict[str, Any]]:
    """Each of the tenant's rooms with unfinished jobs of the tenant, those in play order (the
    head plays first), and how many jobs of others the room holds (they take turns too: jobs
    a Python producer sent, or any tenant's where rooms are not namespaced)."""
    ledger = ledger_for(settings)
    result = []
    for room in sorted(r for r in ledger.rooms(MAX_ROOMS) if scope.owns_room(r)):
        ids = ledger.room_order(room, MAX_JOBS_PER_ROOM)
        own = [i for i in ids if i.startswith(scope.prefix)]
        if own:
            jobs = [scope.public(_queued_job(ledger, job_id, settings)) for job_id in own]
            public = scope.public_room(room)
            result.append({"room": public, "jobs": jobs, "others": len(ids) - len(own)})
    return result


def recent_ended(settings: Settings, scope: TenantScope) -> list[dict[str, Any]]:
    """The tenant's latest completed, failed and cancelled jobs, newest first, with reasons."""
    r: Any = redis_client(settings.redis_url)  # redis-py types bytes replies as bytes | str
    ended = []
    for _id, fields in r.xrevrange(settings.events_stream, count=EVENTS_SCANNED):
        job_id = _text(fields.get(b"job_id"))
        if _text(fields.get(b"event")) not in TERMINAL_EVENTS or not job_id.startswith(
            scope.prefix
        ):
            continue
        data = json.loads(fields.get(b"data") or b"{}")
        entry = {"job_id": job_id, "ts": float(fields.get(b"ts") or 0)}
        ended.append(scope.public({**entry, **{k: data.get(k) for k in ENDED_FIELDS}}))
        if len(ended) == RECENT_ENDED:
            break
    return ended


def dead_letters(settings: Settings, scope: TenantScope) -> list[dict[str, Any]]:
    """The tenant's dead-lettered jobs, newest first."""
    return [
        scope.public({**entry, "job": scope.public(entry.get("job") or {})})
        for entry in list_dead(settings=settings)
        if str(entry.get("job_id", "")).startswith(scope.prefix)
    ][:DEAD_SHOWN]


def viewer_token(settings: Settings, room: str) -> ViewerToken:
    """A token that may only join `room` and subscribe: no publishing of media or data, hidden
    from the room's other participants. Signed here; the secret never leaves the API."""
    identity = f"console-{secrets.token_hex(4)}"
    now = int(time.time())
    claims = {
        "iss": settings.livekit_api_key,
        "sub": identity,
        "name": "avatarq console",
        "nbf": now,
        "exp": now + VIEWER_TTL_S,
        "video": {
            "roomJoin": True,
            "room": room,
            "canSubscribe": True,
            "canPublish": False,
            "canPublishData": False,
            "hidden": True,
        },
    }
    token = _hs256_jwt(claims, settings.livekit_api_secret.get_secret_value())
    url = settings.livekit_public_url or settings.livekit_url
    return ViewerToken(url=url, token=token, room=room, identity=identity)


def _hs256_jwt(claims: dict[str, Any], secret: str) -> str:
    """A LiveKit access token: a JWT signed with HMAC-SHA256 (the SDK's own format, minted
    here with the standard library because producers never import the worker's SDK)."""

    def part(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    header = part(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = part(json.dumps(claims, separators=(",", ":")).encode())
    signature = hmac.new(secret.encode(), f"{header}.{body}".encode(), hashlib.sha256).digest()
    return f"{header}.{body}.{part(signature)}"


def _page_routes(app: FastAPI) -> None:
    """The page and its assets, or a 503 that says how to build them."""
    index = CONSOLE_DIST / "index.html"
    if index.is_file():
        app.mount("/console/assets", StaticFiles(directory=CONSOLE_DIST / "assets"), "console")
    else:
        log.warning("console disabled: no build at %s; %s", CONSOLE_DIST, BUILD_HINT)

    @app.get("/", include_in_schema=False)
    def root() -> RedirectResponse:
        return RedirectResponse("/console/")

    @app.get("/console", include_in_schema=False)
    def console_no_slash() -> RedirectResponse:
        return RedirectResponse("/console/")

    @app.get("/console/", include_in_schema=False, response_model=None)
    def page() -> Response:
        if not index.is_file():
            message = f"avatarq console disabled: it is not built ({CONSOLE_DIST} missing). "
            return PlainTextResponse(message + BUILD_HINT, status_code=503)
        # The page itself is public and holds no data; every request it makes needs a key.
        return FileResponse(index, headers={"Cache-Control": "no-cache"})


def mount_console(app: FastAPI, tenant: Callable[..., TenantScope], settings: Settings) -> None:
    """Add the console's page and its JSON routes to the API app; `tenant` is the API's own
    dependency that maps a request's key to its tenant (401 without a key, 403 for a wrong one)."""
    _page_routes(app)
    data = APIRouter(prefix="/console/api", tags=["console"])

    # As a default value: these annotations are strings, resolved at module level.
    scoped = Depends(tenant)

    @data.get("/overview")
    def overview(scope: TenantScope = scoped) -> dict[str, Any]:
        """The tenant's rooms with their unfinished jobs in play order (status and progress
        each), its latest ended jobs with their reasons, its dead-lettered jobs, and the
        session quota of each avatar server (sessions, quota, waiting jobs)."""
        return {
            "rooms": rooms(settings, scope),
            "recent": recent_ended(settings, scope),
            "dead": dead_letters(settings, scope),
            "avatar_servers": avatar_capacity(settings),
        }

    @data.post("/dead/{job_id}/retry")
    def retry(job_id: str, scope: TenantScope = scoped) -> dict[str, Any]:
        """Enqueue one of the tenant's dead-lettered jobs again under its own id."""
        try:
            handle = retry_dead(scope.internal(job_id), settings=settings)
        except KeyError:
            raise HTTPException(404, f"job {job_id} is not in the dead-letter list") from None
        return {**scope.public({"job_id": handle.job_id}), "created": handle.created}

    @data.post("/viewer-token")
    def watch(request: WatchRequest, scope: TenantScope = scoped) -> ViewerToken:
        """A subscribe-only LiveKit token for one of the tenant's rooms, so the page can show
        its avatar; `room` in the answer is the tenant's name, the token is for LiveKit's."""
        token = viewer_token(settings, scope.livekit_room(request.room))
        return token.model_copy(update={"room": request.room})

    app.include_router(data)
