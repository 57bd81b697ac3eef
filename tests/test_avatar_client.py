"""The avatar server client against a real HTTP server on loopback."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web

from avatarq.errors import AvatarOverLimit, AvatarRejected, AvatarUnavailable
from tasks import backoff
from tasks.link.avatar import LICENSE_HEADER, START_PATH, STOP_PATH, HttpAvatarClient
from tests.httpserve import serving_app
from tests.ports import refused_port

KEY = "license-123"


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    # Keep the retry schedule's shape but not its seconds.
    monkeypatch.setattr("tasks.link.avatar.backoff_delay", lambda attempt: 0.01 * (attempt + 1))
    assert backoff.backoff_delay(3) <= 4.0


def run_against(
    statuses: list[int],
    body: Callable[[Any], Awaitable[Any]],
    seen: list[dict[str, Any]],
    *,
    headers: dict[str, str] | None = None,
    text: str | None = None,
    hang_s: float = 0.0,
    stop_status: int = 200,
    echo: bool = False,
) -> Any:
    """Serve start-avatar answering `statuses` in turn (with `headers`; a 200 with `text`
    instead of JSON; after `hang_s`; errors echoing the request when `echo`), recording
    requests in `seen`."""

    async def start(request: web.Request) -> web.Response:
        seen.append({"headers": dict(request.headers), "json": await request.json()})
        status = statuses[min(len(seen) - 1, len(statuses) - 1)]
        if hang_s:
            await asyncio.sleep(hang_s)
        if status != 200:
            detail = await request.text() if echo else "nope"
            return web.json_response({"detail": detail}, status=status, headers=headers)
        if text is not None:
            return web.Response(text=text)
        return web.json_response(
            {"session_id": "S1", "status": "started", "avatar_participant_identity": "avatar-a"}
        )

    async def stop(request: web.Request) -> web.Response:
        seen.append({"stop": await request.json()})
        return web.json_response({"status": "stopped"}, status=stop_status)

    async def go() -> Any:
        app = web.Application()
        app.router.add_post(START_PATH, start)
        app.router.add_post(STOP_PATH, stop)
        async with serving_app(app) as port:
            client = HttpAvatarClient("test", f"http://127.0.0.1:{port}/", KEY, attempts=4)
            try:
                return await body(client)
            finally:
                await client.aclose()

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
    with pytest.raises(AvatarUnavailable, match="did not start avatar 'a': HTTP 500"):
        run_against([500], start, [])


def test_4xx_is_permanent_without_retry() -> None:
    seen: list = []
    with pytest.raises(AvatarRejected, match="HTTP 403") as exc:
        run_against([403], start, seen)
    assert exc.value.permanent and KEY not in str(exc.value)
    assert len(seen) == 1


def test_unreachable_server_is_transient() -> None:
    async def go() -> None:
        with refused_port() as port:
            client = HttpAvatarClient("test", f"http://127.0.0.1:{port}", KEY, attempts=3)
            try:
                await start(client)
            finally:
                await client.aclose()

    with pytest.raises(AvatarUnavailable, match="'test' .* did not start avatar") as exc:
        asyncio.run(go())
    assert not exc.value.permanent


@pytest.mark.parametrize("status", [409, 503])
def test_documented_busy_answers_are_transient_and_retried(status: int) -> None:
    seen: list = []
    session = run_against([status, 200], start, seen)
    assert session.session_id == "S1" and len(seen) == 2


def test_retry_after_is_honoured() -> None:
    seen: list = []

    async def timed(client: HttpAvatarClient) -> float:
        t0 = asyncio.get_running_loop().time()
        await start(client)
        return asyncio.get_running_loop().time() - t0

    waited = run_against([503, 200], timed, seen, headers={"Retry-After": "0.4"})
    assert waited >= 0.4 and len(seen) == 2


def test_a_200_that_is_not_json_is_a_started_session_without_id() -> None:
    seen: list = []
    session = run_against([200], start, seen, text="avatar started")
    assert session.session_id is None and session.acknowledged
    assert session.participant_identity == "avatar-a" and len(seen) == 1


def test_a_lost_answer_is_never_followed_by_a_second_start(monkeypatch: pytest.MonkeyPatch) -> None:
    # The server took the request and is slow to answer (a cold GPU start): asking again
    # would start a second session with the same identity.
    monkeypatch.setattr("tasks.link.avatar.START_ANSWER_TIMEOUT_S", 0.3)
    seen: list = []
    session = run_against([200], start, seen, hang_s=1.0)
    assert not session.acknowledged and session.session_id is None
    assert len(seen) == 1


def test_stop_404_is_tolerated_and_reported_as_not_stopped() -> None:
    async def body(client: HttpAvatarClient) -> Any:
        return await client.stop(await start(client))

    assert run_against([200], body, [], stop_status=404) is False
    assert run_against([200], body, [], stop_status=200) is True


def test_error_text_never_echoes_the_license_or_token() -> None:
    with pytest.raises(AvatarRejected) as exc:
        run_against([400], start, [], echo=True)
    message = str(exc.value)
    assert "HTTP 400" in message and "'test'" in message
    assert KEY not in message and '"tok"' not in message and "***" in message


def test_429_is_the_session_limit_raised_at_once_for_the_quota() -> None:
    """Over the license's session limit: no retry here; tasks/link/quota.py waits for a slot."""
    seen: list = []
    with pytest.raises(AvatarOverLimit, match="session limit") as exc:
        run_against([429, 200], start, seen)
    assert not exc.value.permanent and len(seen) == 1
