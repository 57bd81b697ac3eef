"""The dev LiveKit server against the unmodified `livekit` SDK and `livekit-api`.

Every test drives real `livekit.rtc.Room` clients (libwebrtc inside) in this process on its own
asyncio loop, against the server running as a subprocess (the `livekit_server` fixture).
They must run inside infra/netns-run: libwebrtc ignores loopback, so without the namespace's
veth address no ICE candidate pair exists.

    infra/netns-run .venv/bin/pytest tests/test_livekit_server.py -x -q
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import hashlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest
from livekit import api, rtc

from tests.netns import NETNS

pytestmark = [
    *NETNS,
    pytest.mark.timeout(90),
    # The test key pair is livekit-server's short dev secret on purpose.
    pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning"),
]

T = TypeVar("T")
STEP_TIMEOUT = 20.0  # seconds for any single await on the SDK
AUDIO_TOPIC = "lk.audio_stream"


def token(
    server: Any,
    identity: str,
    room: str,
    *,
    kind: str = "",
    attributes: dict[str, str] | None = None,
    metadata: str = "",
    ttl: datetime.timedelta = datetime.timedelta(minutes=10),
    secret: str | None = None,
    room_join: bool = True,
) -> str:
    at = (
        api.AccessToken(server.api_key, secret or server.api_secret)
        .with_identity(identity)
        .with_ttl(ttl)
        .with_grants(api.VideoGrants(room_join=room_join, room=room, can_update_own_metadata=True))
    )
    if kind:
        at = at.with_kind(kind)  # type: ignore[arg-type]
    if attributes:
        at = at.with_attributes(attributes)
    if metadata:
        at = at.with_metadata(metadata)
    return at.to_jwt()


def run(coro_fn: Callable[[], Awaitable[T]], timeout: float = 60.0) -> T:
    """Run one test body on a fresh event loop, bounded in time."""

    async def bounded() -> T:
        return await asyncio.wait_for(coro_fn(), timeout)

    return asyncio.run(bounded())


async def wait(aw: Awaitable[T], timeout: float = STEP_TIMEOUT) -> T:
    return await asyncio.wait_for(aw, timeout)


@asynccontextmanager
async def joined(server: Any, identity: str, room: str, **kw: Any) -> AsyncIterator[rtc.Room]:
    r = rtc.Room()
    await wait(r.connect(server.url, token(server, identity, room, **kw)))
    try:
        yield r
    finally:
        await wait(r.disconnect())


async def remote(room: rtc.Room, identity: str) -> rtc.RemoteParticipant:
    """The remote participant `identity`, waiting for it to show up."""
    for _ in range(int(STEP_TIMEOUT / 0.05)):
        if identity in room.remote_participants:
            return room.remote_participants[identity]
        await asyncio.sleep(0.05)
    raise TimeoutError(f"{identity} never joined")


async def until(predicate: Callable[[], bool], what: str) -> None:
    for _ in range(int(STEP_TIMEOUT / 0.05)):
        if predicate():
            return
        await asyncio.sleep(0.05)
    raise TimeoutError(what)


def test_join_see_each_other_and_leave(livekit_server: Any) -> None:
    async def body() -> None:
        async with joined(
            livekit_server, "alice", "room-join", attributes={"role": "user"}, metadata="m-a"
        ) as a:
            assert a.name == "room-join"
            assert a.local_participant.sid.startswith("PA_")
            assert (await a.sid).startswith("RM_")
            left = asyncio.Event()
            a.on(
                "participant_disconnected",
                lambda p: left.set() if p.identity == "avatar" else None,
            )
            async with joined(
                livekit_server, "avatar", "room-join", kind="agent", attributes={"lk.x": "1"}
            ) as b:
                seen_by_a = await remote(a, "avatar")
                assert seen_by_a.kind == rtc.ParticipantKind.PARTICIPANT_KIND_AGENT
                assert seen_by_a.attributes == {"lk.x": "1"}
                seen_by_b = b.remote_participants["alice"]  # present from the JoinResponse
                assert seen_by_b.kind == rtc.ParticipantKind.PARTICIPANT_KIND_STANDARD
                assert seen_by_b.attributes == {"role": "user"}
                assert seen_by_b.metadata == "m-a"

                # Attribute and metadata changes from a client reach the others.
                changed = asyncio.Event()
                b.on(
                    "participant_attributes_changed",
                    lambda changes, p: changed.set() if changes.get("state") == "busy" else None,
                )
                await wait(a.local_participant.set_attributes({"state": "busy"}))
                await wait(changed.wait())
                assert seen_by_b.attributes == {"role": "user", "state": "busy"}
                await wait(a.local_participant.set_metadata("m-a2"))
                await until(lambda: seen_by_b.metadata == "m-a2", "metadata update")
            await wait(left.wait())
            assert "avatar" not in a.remote_participants

    run(body)


def test_byte_stream_1mb_intact(livekit_server: Any) -> None:
    payload = os.urandom(1_000_000)
    attributes = {"sample_rate": "16000", "num_channels": "1"}

    async def body() -> None:
        async with (
            joined(livekit_server, "sender", "room-stream") as a,
            joined(livekit_server, "receiver", "room-stream") as b,
            joined(livekit_server, "bystander", "room-stream") as c,
        ):
            done: asyncio.Future[tuple[bytes, dict[str, str], str]] = (
                asyncio.get_running_loop().create_future()
            )

            async def read(reader: rtc.ByteStreamReader, sender: str) -> None:
                chunks = [chunk async for chunk in reader]
                done.set_result((b"".join(chunks), dict(reader.info.attributes or {}), sender))

            tasks: set[asyncio.Task[None]] = set()

            def on_stream(reader: rtc.ByteStreamReader, sender: str) -> None:
                task = asyncio.ensure_future(read(reader, sender))
                tasks.add(task)

            stray: list[str] = []
            b.register_byte_stream_handler(AUDIO_TOPIC, on_stream)
            c.register_byte_stream_handler(AUDIO_TOPIC, lambda r, s: stray.append(s))
            await remote(a, "receiver")
            writer = await wait(
                a.local_participant.stream_bytes(
                    "audio",
                    topic=AUDIO_TOPIC,
                    attributes=attributes,
                    destination_identities=["receiver"],
                    total_size=len(payload),
                )
            )
            for i in range(0, len(payload), 64 * 1024):
                await wait(writer.write(payload[i : i + 64 * 1024]))
            await wait(writer.aclose())
            data, got_attributes, sender = await wait(done, 40)
            assert hashlib.sha256(data).hexdigest() == hashlib.sha256(payload).hexdigest()
            assert got_attributes == attributes
            assert sender == "sender"
            assert stray == []  # addressed to "receiver" only

    run(body, timeout=80)


def test_rpc_both_ways_with_error(livekit_server: Any) -> None:
    async def body() -> None:
        async with (
            joined(livekit_server, "caller", "room-rpc") as a,
            joined(livekit_server, "callee", "room-rpc") as b,
        ):

            @b.local_participant.register_rpc_method("echo")
            async def echo(data: rtc.RpcInvocationData) -> str:
                return f"{data.caller_identity}:{data.payload}"

            @b.local_participant.register_rpc_method("fail")
            async def fail(data: rtc.RpcInvocationData) -> str:
                raise rtc.RpcError(1500, "no avatar available", data="{}")

            @a.local_participant.register_rpc_method("ping")
            def ping(data: rtc.RpcInvocationData) -> str:
                return "pong:" + data.payload

            await remote(a, "callee")
            await remote(b, "caller")
            big = "x" * 10_000
            reply = await wait(
                a.local_participant.perform_rpc(
                    destination_identity="callee", method="echo", payload=big
                )
            )
            assert reply == "caller:" + big
            reply = await wait(
                b.local_participant.perform_rpc(
                    destination_identity="caller", method="ping", payload="1"
                )
            )
            assert reply == "pong:1"
            with pytest.raises(rtc.RpcError) as err:
                await wait(
                    a.local_participant.perform_rpc(
                        destination_identity="callee", method="fail", payload=""
                    )
                )
            assert err.value.code == 1500
            assert err.value.message == "no avatar available"

    run(body)


def test_track_publish_mute_unpublish(livekit_server: Any) -> None:
    async def body() -> None:
        async with (
            joined(livekit_server, "publisher", "room-track") as a,
            joined(livekit_server, "viewer", "room-track") as b,
        ):
            published: asyncio.Future[rtc.RemoteTrackPublication] = (
                asyncio.get_running_loop().create_future()
            )
            unpublished = asyncio.Event()
            b.on(
                "track_published",
                lambda pub, p: published.set_result(pub) if not published.done() else None,
            )
            b.on("track_unpublished", lambda pub, p: unpublished.set())
            source = rtc.VideoSource(64, 64)
            track = rtc.LocalVideoTrack.create_video_track("cam", source)
            options = rtc.TrackPublishOptions(source=rtc.TrackSource.SOURCE_CAMERA)
            local_pub = await wait(a.local_participant.publish_track(track, options))
            assert local_pub.sid.startswith("TR_")
            pub = await wait(published)
            assert pub.sid == local_pub.sid
            assert pub.name == "cam"
            assert pub.kind == rtc.TrackKind.KIND_VIDEO

            track.mute()
            await until(lambda: pub.muted, "mute seen by viewer")

            await wait(a.local_participant.unpublish_track(local_pub.sid))
            await wait(unpublished.wait())

    run(body)


def test_duplicate_identity_kicks_first(livekit_server: Any) -> None:
    async def body() -> None:
        first = rtc.Room()
        reasons: list[Any] = []
        disconnected = asyncio.Event()
        first.on("disconnected", lambda reason: (reasons.append(reason), disconnected.set()))
        await wait(first.connect(livekit_server.url, token(livekit_server, "dup", "room-dup")))
        try:
            async with (
                joined(livekit_server, "observer", "room-dup") as observer,
                joined(livekit_server, "dup", "room-dup") as second,
            ):
                await wait(disconnected.wait())
                assert reasons == [rtc.DisconnectReason.DUPLICATE_IDENTITY]
                assert second.isconnected()
                await until(
                    lambda: (
                        "dup" in observer.remote_participants
                        and observer.remote_participants["dup"].sid == second.local_participant.sid
                    ),
                    "observer sees the second session",
                )
        finally:
            await wait(first.disconnect())

    run(body)


def test_room_service_twirp(livekit_server: Any) -> None:
    async def body() -> None:
        lkapi = api.LiveKitAPI(
            livekit_server.url, livekit_server.api_key, livekit_server.api_secret
        )
        try:
            svc = lkapi.room
            created = await wait(svc.create_room(api.CreateRoomRequest(name="room-api")))
            assert created.sid.startswith("RM_")
            listed = await wait(svc.list_rooms(api.ListRoomsRequest()))
            assert "room-api" in [r.name for r in listed.rooms]

            async with (
                joined(livekit_server, "member", "room-api") as member,
                joined(livekit_server, "other", "room-api") as other,
            ):
                parts = await wait(
                    svc.list_participants(api.ListParticipantsRequest(room="room-api"))
                )
                assert sorted(p.identity for p in parts.participants) == ["member", "other"]
                info = await wait(
                    svc.get_participant(
                        api.RoomParticipantIdentity(room="room-api", identity="member")
                    )
                )
                assert info.sid == member.local_participant.sid

                attrs_seen = asyncio.Event()
                other.on(
                    "participant_attributes_changed",
                    lambda ch, p: attrs_seen.set() if ch.get("avatar") == "ready" else None,
                )
                updated = await wait(
                    svc.update_participant(
                        api.UpdateParticipantRequest(
                            room="room-api",
                            identity="member",
                            metadata="from-api",
                            attributes={"avatar": "ready"},
                        )
                    )
                )
                assert updated.metadata == "from-api"
                await wait(attrs_seen.wait())
                await until(lambda: member.local_participant.metadata == "from-api", "own update")

                received: asyncio.Future[rtc.DataPacket] = (
                    asyncio.get_running_loop().create_future()
                )
                member.on(
                    "data_received",
                    lambda pkt: received.set_result(pkt) if not received.done() else None,
                )
                await wait(
                    svc.send_data(
                        api.SendDataRequest(
                            room="room-api",
                            data=b"server says hi",
                            kind=api.DataPacket.Kind.RELIABLE,
                            destination_identities=["member"],
                            topic="news",
                        )
                    )
                )
                pkt = await wait(received)
                assert (pkt.data, pkt.topic) == (b"server says hi", "news")

                other_gone = asyncio.Event()
                other.on("disconnected", lambda reason: other_gone.set())
                await wait(
                    svc.remove_participant(
                        api.RoomParticipantIdentity(room="room-api", identity="other")
                    )
                )
                await wait(other_gone.wait())

                with pytest.raises(api.TwirpError) as err:
                    await wait(
                        svc.get_participant(
                            api.RoomParticipantIdentity(room="room-api", identity="nobody")
                        )
                    )
                assert (err.value.code, err.value.status) == ("not_found", 404)

                member_gone = asyncio.Event()
                member.on("disconnected", lambda reason: member_gone.set())
                await wait(svc.delete_room(api.DeleteRoomRequest(room="room-api")))
                await wait(member_gone.wait())
            listed = await wait(svc.list_rooms(api.ListRoomsRequest(names=["room-api"])))
            assert list(listed.rooms) == []
            with pytest.raises(api.TwirpError) as err:
                await wait(svc.delete_room(api.DeleteRoomRequest(room="room-api")))
            assert err.value.code == "not_found"
        finally:
            await lkapi.aclose()

    run(body)


def test_create_room_answers_an_existing_room_as_it_is(livekit_server: Any) -> None:
    """CreateRoom of a room that is open returns it unchanged, ignoring what the second call
    asks for (livekit-server: RoomManager.getOrCreateRoom); tasks/link/roomhold.py reads the
    timeouts of that answer to decide whether a job needs a keeper (AvatarLink.cover)."""
    from avatarq.settings import Settings
    from tasks.link import roomhold

    settings = Settings(
        livekit_url=livekit_server.url,
        livekit_api_key=livekit_server.api_key,
        livekit_api_secret=livekit_server.api_secret,
    )

    async def body() -> None:
        lkapi = api.LiveKitAPI(
            livekit_server.url, livekit_server.api_key, livekit_server.api_secret
        )
        try:
            svc = lkapi.room
            first = await wait(
                svc.create_room(
                    api.CreateRoomRequest(
                        name="room-exists", empty_timeout=30, departure_timeout=25, metadata="m1"
                    )
                )
            )
            assert (first.empty_timeout, first.departure_timeout) == (30, 25)
            again = await wait(
                svc.create_room(
                    api.CreateRoomRequest(
                        name="room-exists", empty_timeout=600, departure_timeout=600, metadata="m2"
                    )
                )
            )
            assert (again.sid, again.creation_time, again.metadata) == (
                first.sid,
                first.creation_time,
                "m1",
            )
            assert (again.empty_timeout, again.departure_timeout) == (30, 25)

            existing = await wait(roomhold.hold_room_open(settings, "room-exists", 120.0))
            assert not existing.covers(120.0)
            assert (existing.empty_timeout_s, existing.departure_timeout_s) == (30, 25)
            fresh = await wait(roomhold.hold_room_open(settings, "room-held", 120.0))
            timeout = roomhold.room_timeout_for(120.0)
            assert (fresh.empty_timeout_s, fresh.departure_timeout_s) == (timeout, timeout)
            assert fresh.covers(120.0)
        finally:
            for name in ("room-exists", "room-held"):
                with contextlib.suppress(api.TwirpError):
                    await svc.delete_room(api.DeleteRoomRequest(room=name))
            await lkapi.aclose()

    run(body)


def test_bad_tokens_rejected(livekit_server: Any) -> None:
    expired = datetime.timedelta(seconds=-3600)
    bad = {
        "bad signature": token(livekit_server, "x", "room-auth", secret="not-the-secret"),
        "expired": token(livekit_server, "x", "room-auth", ttl=expired),
        "no roomJoin": token(livekit_server, "x", "room-auth", room_join=False),
    }

    async def body() -> None:
        http = livekit_server.url.replace("ws://", "http://")
        async with aiohttp.ClientSession() as session:
            for what, jwt in bad.items():
                headers = {"Authorization": f"Bearer {jwt}"}
                async with session.get(f"{http}/rtc/validate", headers=headers) as resp:
                    assert resp.status == 401, what
                room = rtc.Room()
                with pytest.raises(rtc.ConnectError):
                    await wait(room.connect(livekit_server.url, jwt))
            good = token(livekit_server, "x", "room-auth")
            async with session.get(f"{http}/rtc/validate?access_token={good}") as resp:
                assert resp.status == 200
            if livekit_server.server == "embedded":
                # No /rtc/v1 here: the SDK falls back to the legacy /rtc path.
                async with session.get(f"{http}/rtc/v1") as resp:
                    assert resp.status == 404
            else:
                # The SDK's production path (/rtc/v1, one peer connection) on the official one.
                room = rtc.Room()
                await wait(room.connect(livekit_server.url, good))
                await room.disconnect()
                log = Path(livekit_server.log_path).read_text()
                assert '"UseSinglePeerConnection": true' in log
            if livekit_server.server == "embedded":
                # Stricter than the official server, whose validate ignores `room`: a client
                # asking for another room than its token grants is refused.
                async with session.get(
                    f"{http}/rtc/validate?access_token={good}&room=other-room"
                ) as resp:
                    assert resp.status == 401

            # Twirp with a JSON body, and Twirp's JSON errors.
            twirp = f"{http}/twirp/livekit.RoomService"
            lister = api.AccessToken(livekit_server.api_key, livekit_server.api_secret)
            lister = lister.with_grants(api.VideoGrants(room_list=True)).to_jwt()
            json_headers = {"Authorization": f"Bearer {lister}"}
            async with session.post(f"{twirp}/ListRooms", json={}, headers=json_headers) as resp:
                assert resp.status == 200
                assert resp.content_type == "application/json"
                assert isinstance(await resp.json(), dict)
            async with session.post(f"{twirp}/ListRooms", json={}) as resp:
                assert resp.status == 401
                assert (await resp.json())["code"] == "unauthenticated"
            async with session.post(
                f"{twirp}/CreateRoom", json={"name": "x"}, headers=json_headers
            ) as resp:
                assert resp.status == 401  # roomList does not grant roomCreate
            async with session.post(f"{twirp}/NoSuchMethod", json={}, headers=json_headers) as resp:
                assert resp.status == 404
                assert (await resp.json())["code"] == "bad_route"

    run(body)


def test_resume_after_server_restart_falls_back_to_full_rejoin(tmp_path: Any) -> None:
    """The restarted server does not know the session the SDK tries to resume; it answers
    like livekit-server (LeaveRequest, action RECONNECT) and the SDK rejoins from scratch."""
    import signal

    from avatarq_dev.processes import python_module

    proc = python_module(
        "livekit-server",
        "avatarq_dev.livekit_server",
        lambda ports: ["--port", str(ports[0]), "--keys", "devkey: secret"],
        ports=["tcp"],
        log_dir=tmp_path,
    )
    with proc:
        url = f"ws://127.0.0.1:{proc.port}"
        server = type("S", (), {"url": url, "api_key": "devkey", "api_secret": "secret"})()

        async def body() -> None:
            async with joined(server, "survivor", "room-restart") as room:
                reconnected = asyncio.Event()
                room.on("reconnected", reconnected.set)
                proc.signal(signal.SIGKILL)  # no goodbye: the client sees the socket die
                assert proc.proc is not None
                await asyncio.to_thread(proc.proc.wait, 10)
                await asyncio.to_thread(proc.start)  # on the same port: a restart
                await wait(reconnected.wait(), 40)
                assert room.isconnected()
                lkapi = api.LiveKitAPI(url, "devkey", "secret")
                try:
                    parts = await wait(
                        lkapi.room.list_participants(
                            api.ListParticipantsRequest(room="room-restart")
                        )
                    )
                finally:
                    await lkapi.aclose()
                assert [p.identity for p in parts.participants] == ["survivor"]
                assert parts.participants[0].sid == room.local_participant.sid

        run(body, timeout=80)
