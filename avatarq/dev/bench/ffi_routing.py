"""An experiment for the sender benchmark (`--route-events`): deliver each LiveKit FFI event
only to the room it belongs to.

livekit-rtc 1.x hands every FFI event (each write's completion, each RPC, each room event of
any room) to every `rtc.Room` of the process: one `call_soon_threadsafe` (a self-pipe write)
per room, then each room's listen task wakes, looks, and passes it on to its own queue. With
N streams (and a keeper room each) that is O(N) work per event and O(N²) per second: the
profile's largest Python cost (docs/performance.md). Narrowing a room's subscription to its
own events removes that term; this module measures how much, without changing the worker.
It reaches into the SDK's private subscriber list, so it is bench-only.
"""

from __future__ import annotations

from livekit import rtc
from livekit.rtc._ffi_client import FfiClient
from livekit.rtc._proto import ffi_pb2 as proto_ffi

#: Callbacks a room's listen task forwards to its local participant (publish_track /
#: unpublish_track waiters); rare, and carrying no room handle, so every room keeps them.
_SHARED = frozenset({"publish_track", "unpublish_track"})


def route_room_events(room: rtc.Room) -> None:
    """Narrow `room`'s FFI subscription (made by `connect`) to its own events."""
    assert room._ffi_handle is not None
    handle = room._ffi_handle.handle
    participant = room.local_participant._ffi_handle.handle

    def ours(event: proto_ffi.FfiEvent) -> bool:
        which = event.WhichOneof("message")
        if which == "room_event":
            return bool(event.room_event.room_handle == handle)
        if which == "rpc_method_invocation":
            return bool(event.rpc_method_invocation.local_participant_handle == participant)
        return which in _SHARED

    queue = FfiClient.instance.queue
    with queue._lock:
        for i, (q, loop, _) in enumerate(queue._subscribers):
            if q is room._ffi_queue:
                queue._subscribers[i] = (q, loop, ours)
                return
    raise RuntimeError("the room's FFI subscription was not found (SDK changed?)")
