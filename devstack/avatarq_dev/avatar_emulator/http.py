"""HTTP API of the avatar emulator: Avaluma's start/stop endpoints plus emulator-only ones.

Avaluma's (`api-secret` header): POST /v1/livekit/start-avatar and /v1/livekit/stop-avatar.
Emulator-only (no auth; tests and benchmarks): GET /v1/sessions[?room=R] and
/v1/sessions/{session_id} (state, segments, underruns, recordings), GET|POST /_emulator/faults
(fault injection, see `Faults`), GET /healthz (and /health)."""

from __future__ import annotations

import asyncio
import hmac
import logging
import uuid
from pathlib import Path
from typing import Any

from aiohttp import web
from pydantic import ValidationError

from .behaviour import Faults
from .session import AvatarSession, TokenError, TokenInfo

logger = logging.getLogger(__name__)

API_SECRET_HEADER = "api-secret"
START_PATH = "/v1/livekit/start-avatar"
STOP_PATH = "/v1/livekit/stop-avatar"
SESSIONS_PATH = "/v1/sessions"
SESSION_PATH = "/v1/sessions/{session_id}"
FAULTS_PATH = "/_emulator/faults"
_LIVEKIT_URL_SCHEMES = ("ws://", "wss://", "http://", "https://")


class RequestError(Exception):
    """Becomes a JSON error answer `{"error": message, "code": code}`."""

    def __init__(
        self, status: int, code: str, message: str, *, retry_after: float | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after

    def response(self) -> web.Response:
        headers = {} if self.retry_after is None else {"Retry-After": f"{self.retry_after:g}"}
        body = {"error": self.message, "code": self.code}
        return web.json_response(body, status=self.status, headers=headers)


class Emulator:
    """All sessions of one emulator process, kept after they end so tests can inspect them."""

    def __init__(self, license_key: str, record_dir: Path | None) -> None:
        if not license_key:
            raise ValueError("a license key is required")
        self._license_key = license_key
        self.record_dir = record_dir
        self.sessions: dict[str, AvatarSession] = {}
        self.faults = Faults()
        #: Most sessions active at once since the emulator started (quota tests).
        self.peak_sessions = 0

    def check_license(self, request: web.Request) -> None:
        secret = request.headers.get(API_SECRET_HEADER)
        if not secret:
            raise RequestError(401, "MISSING_API_SECRET", f"missing {API_SECRET_HEADER} header")
        if not self.is_license_key(secret):
            raise RequestError(403, "INVALID_LICENSE", "invalid license key")

    def is_license_key(self, candidate: str) -> bool:
        return hmac.compare_digest(candidate.encode(), self._license_key.encode())

    def active_sessions(self) -> list[AvatarSession]:
        return [s for s in self.sessions.values() if not s.done]

    async def stop_all(self, reason: str) -> None:
        for session in self.active_sessions():
            await session.stop(reason)


async def _json_object(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError:
        raise RequestError(400, "INVALID_REQUEST", "body is not JSON") from None
    if not isinstance(body, dict):
        raise RequestError(400, "INVALID_REQUEST", "body is not a JSON object")
    return body


def _required_str(body: dict[str, Any], field: str) -> str:
    value = body.get(field)
    if value is None:
        raise RequestError(400, "MISSING_PARAMETER", f"missing field: {field}")
    if not isinstance(value, str) or not value:
        raise RequestError(400, "INVALID_PARAMETER", f"{field} must be a non-empty string")
    return value


def create_app(emulator: Emulator) -> web.Application:
    routes = web.RouteTableDef()

    @routes.post(START_PATH)
    async def start_avatar(request: web.Request) -> web.Response:
        emulator.check_license(request)
        body = await _json_object(request)
        livekit_url = _required_str(body, "livekit_url")
        if not livekit_url.startswith(_LIVEKIT_URL_SCHEMES):
            raise RequestError(400, "INVALID_PARAMETER", "livekit_url must be a ws(s) URL")
        token = _required_str(body, "livekit_token")
        avatar_id = _required_str(body, "avaluma_avatar_id")
        # The plugin sends `avaluma_key`; Avaluma's API notes call it `avaluma_license_key`.
        key_field = "avaluma_license_key" if "avaluma_license_key" in body else "avaluma_key"
        if not emulator.is_license_key(_required_str(body, key_field)):
            raise RequestError(403, "INVALID_LICENSE", f"{key_field} is not a valid license key")
        try:
            info = TokenInfo.parse(token)
        except TokenError as e:
            raise RequestError(400, "INVALID_PARAMETER", str(e)) from None

        faults = emulator.faults.model_copy(deep=True)
        if faults.fail_next_starts > 0:
            emulator.faults.fail_next_starts -= 1
            raise RequestError(
                faults.fail_status,
                "INJECTED_FAULT",
                "injected start failure",
                retry_after=faults.retry_after_s,
            )
        if (
            faults.max_sessions is not None
            and len(emulator.active_sessions()) >= faults.max_sessions
        ):
            raise RequestError(
                429, "TOO_MANY_SESSIONS", f"over the limit of {faults.max_sessions} sessions"
            )

        session_id = f"sess_{uuid.uuid4().hex[:16]}"
        session = AvatarSession(
            session_id,
            livekit_url=livekit_url,
            token=token,
            token_info=info,
            avatar_id=avatar_id,
            record_dir=emulator.record_dir,
            behaviour=faults,
        )
        emulator.sessions[session_id] = session
        session.start()
        logger.info(
            "session %s started: avatar %s as %s in room %s (sender %s)",
            session_id,
            avatar_id,
            info.identity,
            info.room,
            info.sender_identity or "first agent",
        )
        emulator.peak_sessions = max(emulator.peak_sessions, len(emulator.active_sessions()))
        if faults.start_delay_s:
            await asyncio.sleep(faults.start_delay_s)
        if faults.start_body == "text":
            return web.Response(text="avatar started", content_type="text/plain")
        return web.json_response(
            {
                "session_id": session_id,
                "status": "started",
                "avatar_participant_identity": info.identity,
            }
        )

    @routes.post(STOP_PATH)
    async def stop_avatar(request: web.Request) -> web.Response:
        if not emulator.faults.stop_endpoint:
            raise web.HTTPNotFound()
        emulator.check_license(request)
        body = await _json_object(request)
        session = emulator.sessions.get(_required_str(body, "session_id"))
        if session is None:
            raise RequestError(404, "SESSION_NOT_FOUND", "session not found")
        # Waits for the session to leave, so its recording is complete when we answer.
        await session.stop("stop_request")
        return web.json_response({"status": "stopped"})

    @routes.get(SESSIONS_PATH)
    async def list_sessions(request: web.Request) -> web.Response:
        room = request.query.get("room")
        found = [s.snapshot() for s in emulator.sessions.values() if room in (None, s.info.room)]
        return web.json_response(found)

    @routes.get(SESSION_PATH)
    async def get_session(request: web.Request) -> web.Response:
        session = emulator.sessions.get(request.match_info["session_id"])
        if session is None:
            raise RequestError(404, "SESSION_NOT_FOUND", "session not found")
        return web.json_response(session.snapshot())

    @routes.get(FAULTS_PATH)
    async def get_faults(request: web.Request) -> web.Response:
        return web.json_response(emulator.faults.model_dump())

    @routes.post(FAULTS_PATH)
    async def set_faults(request: web.Request) -> web.Response:
        try:
            emulator.faults.update(await _json_object(request))
        except ValidationError as e:
            raise RequestError(400, "INVALID_PARAMETER", str(e)) from None
        return web.json_response(emulator.faults.model_dump())

    async def health(request: web.Request) -> web.Response:
        return web.json_response(
            {
                "status": "healthy",
                "active_sessions": len(emulator.active_sessions()),
                "peak_sessions": emulator.peak_sessions,
            }
        )

    @web.middleware
    async def errors_as_json(request: web.Request, handler: Any) -> web.StreamResponse:
        try:
            response: web.StreamResponse = await handler(request)
        except RequestError as e:
            return e.response()
        return response

    async def on_shutdown(app: web.Application) -> None:
        await emulator.stop_all("shutdown")

    app = web.Application(middlewares=[errors_as_json])
    app.add_routes(routes)
    app.router.add_get("/healthz", health)
    app.router.add_get("/health", health)
    app.on_shutdown.append(on_shutdown)
    return app
