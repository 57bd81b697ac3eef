"""Rooms held open by their own timeouts (tasks/link/roomhold.py): the decision from CreateRoom's
answer, its errors, and on the official livekit-server the rooms themselves.

The server tests use the `livekit_server` fixture's official server, whose room defaults are
2 s empty / 2 s departure (the real ones are 300 s / 20 s): a room left to them closes within
seconds once only agents are in it, so a hold that does not work fails here in seconds.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import Any, TypeVar

import pytest
from aiohttp import web
from livekit import api, rtc

from avatarq.errors import LiveKitRejected, RoomError
from avatarq.settings import Settings
from tasks.link import room as rooms
from tasks.link import roomhold, tokens
from tests.httpserve import serving_app
from tests.netns import NETNS
from tests.ports import refused_port

# The test key pair is livekit-server's short dev secret on purpose.
pytestmark = pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")

T = TypeVar("T")
NOW = 1_800_000_000.0
#: The fixture's room defaults (tests/conftest.py).
SERVER_TIMEOUT_S = 2
#: Past the server's own timeout, with its once-a-second idle check and whole-second clock.
PAST_SERVER_TIMEOUT_S = SERVER_TIMEOUT_S + 3.0

F = TypeVar("F", bound=Callable[..., None])


def on_official_server(test: F) -> F:
    """Run `test` inside the namespace against the fixture's official server only."""
    marks = [
        *NETNS,
        pytest.mark.parametrize("livekit_server", ["official"], indirect=True),
    ]
    for mark in marks:
        test = mark(test)
    return test


def answer(empty: int, departure: int, *, age_s: float = 0.0) -> api.Room:
    created_ms = int((NOW - age_s) * 1000)
    return api.Room(
        name="r",
        empty_timeout=empty,
        departure_timeout=departure,
        creation_time=created_ms // 1000,
        creation_time_ms=created_ms,
    )


# -- the decision ----------------------------------------------------------------------------


def test_a_room_created_for_the_hold_needs_no_keeper() -> None:
    timeout = roomhold.room_timeout_for(100.0)
    hold = roomhold.hold_of(answer(timeout, timeout))
    assert hold.covers(100.0, now=NOW) and not hold.covers(timeout, now=NOW)


def test_the_shorter_timeout_decides() -> None:
    """empty_timeout holds while no one but agents ever joined, departure_timeout once a
    viewer came and left: either may be the one that applies during the job."""
    assert not roomhold.hold_of(answer(3600, 20)).covers(100.0, now=NOW)
    assert not roomhold.hold_of(answer(20, 3600)).covers(100.0, now=NOW)


def test_the_rooms_age_counts() -> None:
    """livekit-server counts an agent-only room's empty timeout from its creation."""
    assert roomhold.hold_of(answer(600, 600)).covers(300.0, now=NOW)
    assert not roomhold.hold_of(answer(600, 600, age_s=400.0)).covers(300.0, now=NOW)


def test_a_server_clock_a_little_behind_still_covers_a_new_room() -> None:
    timeout = roomhold.room_timeout_for(100.0)
    behind = answer(timeout, timeout, age_s=roomhold.CLOCK_SKEW_S - 1)
    assert roomhold.hold_of(behind).covers(100.0, now=NOW)


def test_unreported_timeouts_or_creation_time_need_a_keeper() -> None:
    assert not roomhold.hold_of(answer(600, 0)).covers(10.0, now=NOW)
    unreported = api.Room(name="r", empty_timeout=600, departure_timeout=600)
    assert not roomhold.hold_of(unreported).covers(10.0, now=NOW)


def test_timeouts_fit_the_protocol() -> None:
    assert roomhold.room_timeout_for(0.4) == 1 + roomhold.TIMEOUT_MARGIN_S
    assert roomhold.room_timeout_for(1e12) == roomhold.MAX_TIMEOUT_S


# -- errors ----------------------------------------------------------------------------------


@asynccontextmanager
async def twirp_answering(status: int, code: str) -> AsyncIterator[str]:
    """A RoomService that answers every call with one Twirp error; yields its URL."""

    async def handle(_request: web.Request) -> web.Response:
        return web.json_response({"code": code, "msg": "no"}, status=status)

    app = web.Application()
    app.router.add_post("/twirp/livekit.RoomService/{method}", handle)
    async with serving_app(app) as port:
        yield f"http://127.0.0.1:{port}"


def settings_for(url: str, secret: str = "secret") -> Settings:
    return Settings(livekit_url=url, livekit_api_key="devkey", livekit_api_secret=secret)


def test_refused_credentials_are_livekit_rejected() -> None:
    async def body() -> None:
        async with twirp_answering(401, "unauthenticated") as url:
            with pytest.raises(LiveKitRejected, match="LIVEKIT_API_SECRET") as info:
                await roomhold.hold_room_open(settings_for(url), "r", 10.0)
        assert info.value.permanent and info.value.reason == "livekit_rejected"

    asyncio.run(body())


@pytest.mark.parametrize("status", [500, 503])
def test_a_failing_server_is_a_room_error(status: int) -> None:
    async def body() -> None:
        async with twirp_answering(status, "unavailable") as url:
            with pytest.raises(RoomError) as info:
                await roomhold.hold_room_open(settings_for(url), "r", 10.0)
        assert not info.value.permanent and info.value.reason == "room_error"

    asyncio.run(body())


def test_an_unreachable_server_is_a_room_error() -> None:
    with refused_port() as port, pytest.raises(RoomError, match="could not create"):
        asyncio.run(roomhold.hold_room_open(settings_for(f"ws://127.0.0.1:{port}"), "r", 10.0))


# -- on the official server ------------------------------------------------------------------


def run(aw: Awaitable[T], timeout: float = 60.0) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(aw, timeout)

    return asyncio.run(bounded())


def server_settings(server: Any) -> Settings:
    return settings_for(server.url, server.api_secret)


def job_tokens(settings: Settings, room: str) -> tokens.JobTokens:
    job = uuid.uuid4().hex[:8]
    return tokens.mint(
        settings,
        room=room,
        worker_identity=f"avatarq-{job}",
        avatar_identity=f"avatar-{job}",
        ttl=timedelta(minutes=5),
    )


async def join_agents(settings: Settings, room: str) -> list[rtc.Room]:
    """The job's worker and, standing in for the avatar, a participant with its token (kind
    agent): the two agents a room holds while a job plays."""
    t = job_tokens(settings, room)
    return list(
        await asyncio.gather(
            *(rooms.connect(settings.livekit_url, jwt) for jwt in (t.worker, t.avatar))
        )
    )


def viewer_token(settings: Settings, room: str) -> str:
    """A standard participant's: one that keeps the room open while it is there."""
    return (
        api.AccessToken(settings.livekit_api_key, settings.livekit_api_secret.get_secret_value())
        .with_identity("viewer")
        .with_grants(api.VideoGrants(room_join=True, room=room))
        .to_jwt()
    )


async def listed(settings: Settings, room: str) -> bool:
    lkapi = api.LiveKitAPI(
        settings.livekit_url,
        settings.livekit_api_key,
        settings.livekit_api_secret.get_secret_value(),
    )
    try:
        found = await lkapi.room.list_rooms(api.ListRoomsRequest(names=[room]))
    finally:
        await lkapi.aclose()
    return bool(found.rooms)


@on_official_server
def test_a_held_room_keeps_its_agents_past_the_servers_timeouts(livekit_server: Any) -> None:
    """Two agents in a room the server created on their join (the control) are put out
    within seconds. In rooms created by hold_room_open they stay: with agents alone (the
    empty timeout applies) and after a viewer came and left (the departure timeout does)."""
    settings = server_settings(livekit_server)
    suffix = uuid.uuid4().hex[:6]
    alone, visited, control = f"alone-{suffix}", f"visited-{suffix}", f"control-{suffix}"

    async def body() -> None:
        for name in (alone, visited):
            assert (await roomhold.hold_room_open(settings, name, 30.0)).covers(30.0)
        joined = {name: await join_agents(settings, name) for name in (alone, visited, control)}
        try:
            viewer = await rooms.connect(settings.livekit_url, viewer_token(settings, visited))
            await rooms.disconnect(viewer)
            await asyncio.sleep(PAST_SERVER_TIMEOUT_S)
            connected = {name: [r.isconnected() for r in rs] for name, rs in joined.items()}
            assert connected == {alone: [True, True], visited: [True, True], control: [False] * 2}
            assert await listed(settings, alone) and await listed(settings, visited)
        finally:
            for rs in joined.values():
                for r in rs:
                    await rooms.disconnect(r)

    run(body())


@on_official_server
def test_an_existing_room_with_short_timeouts_needs_the_keeper(livekit_server: Any) -> None:
    """A viewer's join created the room with the server's 2 s defaults: too short for the
    job, and CreateRoom cannot lengthen them. With the keeper the agents stay after the
    viewer leaves."""
    settings = server_settings(livekit_server)
    name = f"viewed-{uuid.uuid4().hex[:6]}"

    async def body() -> None:
        viewer = await rooms.connect(settings.livekit_url, viewer_token(settings, name))
        hold = await roomhold.hold_room_open(settings, name, 30.0)
        assert not hold.covers(30.0)
        assert (hold.empty_timeout_s, hold.departure_timeout_s) == (SERVER_TIMEOUT_S,) * 2
        agents = await join_agents(settings, name)
        keeper = await rooms.connect(settings.livekit_url, job_tokens(settings, name).keeper)
        try:
            await rooms.disconnect(viewer)
            await asyncio.sleep(PAST_SERVER_TIMEOUT_S)
            assert [r.isconnected() for r in agents] == [True, True]
        finally:
            for r in (*agents, keeper):
                await rooms.disconnect(r)

    run(body())


@on_official_server
def test_a_room_held_before_covers_a_next_hold_only_within_its_timeouts(
    livekit_server: Any,
) -> None:
    """A second call (a next job of the same room) gets the room as the first made it."""
    settings = server_settings(livekit_server)
    name = f"again-{uuid.uuid4().hex[:6]}"

    async def body() -> None:
        first = await roomhold.hold_room_open(settings, name, 30.0)
        within = await roomhold.hold_room_open(settings, name, 30.0)
        beyond = await roomhold.hold_room_open(settings, name, 600.0)
        timeout = roomhold.room_timeout_for(30.0)
        assert first.covers(30.0) and within.covers(30.0) and not beyond.covers(600.0)
        assert (beyond.empty_timeout_s, beyond.departure_timeout_s) == (timeout, timeout)

    run(body())


def test_a_warm_link_whose_room_closes_too_soon_gets_its_keeper(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A link kept warm holds the room by its creation-time timeouts; before a next job that
    # could outlast them, the keeper joins (tasks/link/link.py AvatarLink.cover).
    from avatarq.budget import Budget
    from avatarq.jobs import parse_job
    from avatarq.results import Timestamps
    from tasks.link.link import AvatarLink
    from tasks.link.types import LinkKey, LinkRequest

    joined: list[str] = []

    async def connect(url: str, token: str, **_: Any) -> Any:
        joined.append(token)
        return object()

    monkeypatch.setattr(rooms, "connect", connect)
    settings = Settings(AVATARQ_WARM_IDLE=10)
    job = parse_job({"room": "r1", "avatar_id": "a", "source": "a.wav"}, settings)
    server = settings.avatar_server(None)

    async def unused(*_: Any) -> None:
        raise AssertionError("a keeper's join notes and emits nothing")

    request = LinkRequest(
        job,
        server,
        Budget.of(job, settings),
        10.0,
        Timestamps(picked=0),
        unused,
        unused,
        asyncio.Event(),
    )
    now = time.time()

    def link(open_for_s: float) -> AvatarLink:
        hold = roomhold.RoomHold(now + open_for_s, 600, 600)
        return AvatarLink(LinkKey.of(job, server), None, None, None, None, hold=hold)  # type: ignore[arg-type]

    covered, closing, ending = link(3600.0), link(5.0), link(100.0)
    asyncio.run(covered.cover(request, settings))
    assert covered.keeper is None and joined == []
    # Closing within seconds: the job waits for its keeper.
    asyncio.run(closing.cover(request, settings))
    assert closing.keeper is not None and len(joined) == 1
    asyncio.run(closing.cover(request, settings))  # a keeper is there already
    assert len(joined) == 1

    async def beside() -> tuple[Any, Any]:
        # Open for a while yet, but not for the whole job: the keeper joins beside it.
        await ending.cover(request, settings)
        before = ending.keeper
        await asyncio.sleep(0.05)
        return before, ending.keeper

    before, after = asyncio.run(beside())
    assert before is None and after is not None and len(joined) == 2


def test_a_keeper_that_joined_just_before_the_close_leaves_with_the_link(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The keeper's join finished, its done-callback not run yet, when the link closes: the
    # close must still take it out of the room rather than leave it connected.
    from tasks.link.link import AvatarLink
    from tasks.link.types import LinkKey

    left: list[Any] = []

    async def disconnect(room: Any) -> None:
        left.append(room)

    monkeypatch.setattr(rooms, "disconnect", disconnect)

    class _Quiet:
        async def aclose(self) -> None:
            return None

    async def go() -> Any:
        link = AvatarLink(
            LinkKey("r1", "avatar-a", "default", 16000), "room", _Quiet(), _Quiet(), None
        )  # type: ignore[arg-type]
        keeper = object()
        join = asyncio.get_running_loop().create_future()
        join.set_result(keeper)
        link._keeper_join = join  # done, callback not yet run
        join.add_done_callback(link._keeper_joined)
        await link.close()
        await asyncio.sleep(0)  # the callback runs now, after the close
        return keeper

    keeper = asyncio.run(go())
    assert keeper in left
