"""Rooms given only their own FFI events (tasks/compat.py) still get everything they use,
and nothing of the other rooms of the process. Real `rtc.Room`s against the dev servers."""

from __future__ import annotations

import asyncio
import os
import tomllib
from collections.abc import Awaitable
from pathlib import Path
from typing import Any, TypeVar

import pytest
from livekit import api, rtc
from livekit.rtc._ffi_client import FfiClient
from livekit.rtc._proto import ffi_pb2 as proto_ffi
from packaging.requirements import Requirement
from packaging.version import Version

from tasks import compat
from tests.netns import needs_netns

# The test key pair is livekit-server's short dev secret on purpose.
pytestmark = pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")

ROOT = Path(__file__).resolve().parents[1]
T = TypeVar("T")
STEP_S = 20.0
TOPIC = "lk.audio_stream"


def test_the_installed_sdk_is_one_the_routing_was_verified_for() -> None:
    """An SDK upgrade would turn the routing off; this fails instead of letting it pass
    silently, so that someone re-reads the new `Room._listen_task` (docs/compatibility.md),
    runs the tests below on it and adds the version."""
    assert rtc.__version__ in compat.VERIFIED_SDK_VERSIONS, (
        f"livekit-rtc {rtc.__version__} is not one tasks/compat.py was verified on "
        f"({sorted(compat.VERIFIED_SDK_VERSIONS)})"
    )
    assert compat.routing_verified()


def test_every_minor_release_the_pin_allows_has_a_verified_version() -> None:
    """pyproject.toml admits no livekit release line the routing was not verified on."""
    pins = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (pin,) = [r for r in map(Requirement, pins) if r.name == "livekit"]
    verified = {Version(v) for v in compat.VERIFIED_SDK_VERSIONS}
    assert all(v in pin.specifier for v in verified), (str(pin), verified)
    major = min(verified).major
    assert Version(f"{major + 1}.0.0") not in pin.specifier, str(pin)
    for minor in range(100):
        admitted = any(Version(f"{major}.{minor}.{patch}") in pin.specifier for patch in range(100))
        if admitted:
            assert any(v.minor == minor for v in verified), (
                f"{pin} admits livekit {major}.{minor}.x; the routing is verified on "
                f"{sorted(map(str, verified))}"
            )


def token(server: Any, room: str, identity: str) -> str:
    return (
        api.AccessToken(server.api_key, server.api_secret)
        .with_identity(identity)
        .with_grants(api.VideoGrants(room_join=True, room=room))
        .to_jwt()
    )


async def step(aw: Awaitable[T]) -> T:
    return await asyncio.wait_for(aw, STEP_S)


async def joined(server: Any, room: str, identity: str) -> rtc.Room:
    r = rtc.Room()
    await step(r.connect(server.url, token(server, room, identity)))
    return r


def filter_of(room: rtc.Room) -> Any:
    with FfiClient.instance.queue._lock:
        return next(f for q, _, f in FfiClient.instance.queue._subscribers if q is room._ffi_queue)


@pytest.mark.netns
@needs_netns
def test_routed_rooms_get_their_own_events_and_no_others(livekit_server: Any) -> None:
    async def body() -> None:
        ours, peer = await joined(livekit_server, "route-a", "ours"), None
        other, other_peer = None, None
        try:
            assert compat.route_own_events(ours)
            peer = await joined(livekit_server, "route-a", "peer")
            other = await joined(livekit_server, "route-b", "other")
            assert compat.route_own_events(other)
            other_peer = await joined(livekit_server, "route-b", "other-peer")

            delivered: list[proto_ffi.FfiEvent] = []
            put = ours._ffi_queue.put_nowait

            def record(event: proto_ffi.FfiEvent) -> None:
                delivered.append(event)
                put(event)

            ours._ffi_queue.put_nowait = record  # type: ignore[method-assign]

            # What the worker does with its room: RPC both ways, a byte stream, events.
            ours.local_participant.register_rpc_method("ping", lambda data: "pong")
            received: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

            async def read(reader: rtc.ByteStreamReader) -> None:
                received.set_result(b"".join([chunk async for chunk in reader]))

            tasks: set[asyncio.Task[None]] = set()
            ours.register_byte_stream_handler(
                TOPIC, lambda reader, _who: tasks.add(asyncio.ensure_future(read(reader)))
            )
            peer.local_participant.register_rpc_method("echo", lambda data: data.payload)
            for _ in range(100):
                if "peer" in ours.remote_participants:
                    break
                await asyncio.sleep(0.05)
            answer = await step(
                peer.local_participant.perform_rpc(
                    destination_identity="ours", method="ping", payload=""
                )
            )
            echoed = await step(
                ours.local_participant.perform_rpc(
                    destination_identity="peer", method="echo", payload="x"
                )
            )
            writer = await step(
                peer.local_participant.stream_bytes(
                    "s", topic=TOPIC, destination_identities=["ours"]
                )
            )
            await step(writer.write(b"\x01" * 100_000))
            await step(writer.aclose())
            assert (answer, echoed, await step(received)) == ("pong", "x", b"\x01" * 100_000)
            # A track publication's callback reaches its waiter through the room's queue.
            source = rtc.AudioSource(16000, 1)
            track = rtc.LocalAudioTrack.create_audio_track("a", source)
            publication = await step(ours.local_participant.publish_track(track))
            await step(ours.local_participant.unpublish_track(publication.sid))

            # Busy in the other room: none of it reaches ours.
            other.local_participant.register_rpc_method("ping", lambda data: "pong")
            for _ in range(10):
                await step(
                    other_peer.local_participant.perform_rpc(
                        destination_identity="other", method="ping", payload=""
                    )
                )
            handle = ours._ffi_handle.handle if ours._ffi_handle else None
            kinds = {e.WhichOneof("message") for e in delivered}
            assert kinds <= {
                "room_event",
                "rpc_method_invocation",
                "publish_track",
                "unpublish_track",
            }
            assert all(
                e.room_event.room_handle == handle
                for e in delivered
                if e.WhichOneof("message") == "room_event"
            )
            invocations = [
                e for e in delivered if e.WhichOneof("message") == "rpc_method_invocation"
            ]
            assert len(invocations) == 1  # the peer's ping; none of the other room's ten
        finally:
            # Leaving ends the room's listen task: its end-of-stream event still reaches it.
            for r in (ours, peer, other, other_peer):
                if r is not None:
                    await step(r.disconnect())

    asyncio.run(asyncio.wait_for(body(), 90))


@pytest.mark.netns
@needs_netns
def test_an_unverified_sdk_leaves_the_room_as_it_was(
    livekit_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(compat, "VERIFIED_SDK_VERSIONS", frozenset({"0.0.0"}))

    async def body() -> None:
        room = await joined(livekit_server, "route-c", f"plain-{os.getpid()}")
        try:
            before = filter_of(room)
            assert not compat.route_own_events(room)
            assert filter_of(room) is before
        finally:
            await step(room.disconnect())

    asyncio.run(asyncio.wait_for(body(), 60))
