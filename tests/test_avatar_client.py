"""The avatar server client against a real HTTP server on loopback."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web

from avatarq.dev.processes import free_port
from avatarq.errors import AvatarRejected, AvatarUnavailable
from tasks import backoff
from tasks.avatar import LICENSE_HEADER, START_PATH, STOP_PATH, HttpAvatarClient

KEY = "license-123"


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    # Keep the retry schedule's shape but not its seconds.
    monkeypatch.setattr("tasks.avatar.backoff_delay", lambda attempt: 0.01 * (attempt + 1))
    assert backoff.backoff_delay(3) <= 4.0


def run_against(
    statuses: list[int], body: Callable[[Any], Awaitable[Any]], seen: list[dict[str, Any]]
) -> Any:
    """Serve start-avatar answering `statuses` in turn, recording requests in `seen`."""

    async def start(request: web.Request) -> web.Response:
        seen.append({"headers": dict(request.headers), "json": await request.json()})
        status = statuses[min(len(seen) - 1, len(statuses) - 1)]
        if status != 200:
            return web.json_response({"detail": "nope"}, status=status)
        return web.json_response(
            {"session_id": "S1", "status": "started", "avatar_participant_identity": "avatar-a"}
        )

    async def stop(request: web.Request) -> web.Response:
        seen.append({"stop": await request.json()})
        return web.json_response({"status": "stopped"})

    async def go() -> Any:
        app = web.Application()
        app.router.add_post(START_PATH, start)
        app.router.add_post(STOP_PATH, stop)
        runner = web.AppRunner(app)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        client = HttpAvatarClient(f"http://127.0.0.1:{port}/", KEY, attempts=4)
        try:
            return await body(client)
        finally:
            await client.aclose()
            await runner.cleanup()

    return asyncio.run(go())


async def start(client: HttpAvatarClient) -> Any:
    return await client.start(
        livekit_url="ws://lk", livekit_token="tok", avatar_id="a", avatar_identity="avatar-a"
    )


def test_sends_plugin_protocol_and_stops() -> None:
    async def body(client: HttpAvatarClient) -> Any:
        session = await start(client)
        await client.stop(session)
        return session

    seen: list = []
    session = run_against([200], body, seen)
    assert session.session_id == "S1" and session.participant_identity == "avatar-a"
    assert seen[0]["headers"][LICENSE_HEADER] == KEY
    assert seen[0]["json"] == {
        "livekit_url": "ws://lk",
        "livekit_token": "tok",
        "avaluma_key": KEY,
        "avaluma_avatar_id": "a",
    }
    assert seen[1] == {"stop": {"session_id": "S1"}}


def test_5xx_is_retried_then_succeeds() -> None:
    seen: list = []
    session = run_against([500, 503, 200], start, seen)
    assert session.session_id == "S1" and len(seen) == 3


def test_5xx_every_time_is_unavailable() -> None:
    with pytest.raises(AvatarUnavailable, match="after 4 attempts: HTTP 500"):
        run_against([500], start, [])


def test_4xx_is_permanent_without_retry() -> None:
    seen: list = []
    with pytest.raises(AvatarRejected, match="HTTP 403") as exc:
        run_against([403], start, seen)
    assert exc.value.permanent and KEY not in str(exc.value)
    assert len(seen) == 1


def test_unreachable_server_is_transient() -> None:
    async def go() -> None:
        client = HttpAvatarClient(f"http://127.0.0.1:{free_port()}", KEY, attempts=3)
        try:
            await start(client)
        finally:
            await client.aclose()

    with pytest.raises(AvatarUnavailable, match="unreachable after 3 attempts") as exc:
        asyncio.run(go())
    assert not exc.value.permanent
