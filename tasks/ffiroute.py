"""Give each LiveKit room of the process only its own FFI events.

The SDK hands every FFI event (each write's completion, each room event of any room) to
every `rtc.Room` of the process: a `call_soon_threadsafe` per room, then each room's listen
task wakes and passes the event through its own broadcast queue, awaiting it there, whether
or not it is the room's. With N rooms that is O(N) per event and O(N²) per second. Narrowing
each room's subscription to its own events removes that term (docs/performance.md).

It reaches into the SDK's private subscriber list, so it runs only on the SDK versions whose
`Room._listen_task` was read for it and whose behaviour tests/test_ffiroute.py checks
(docs/compatibility.md): there a room consumes its own `room_event`s, the
`rpc_method_invocation`s of its local participant, and the `publish_track` /
`unpublish_track` callbacks its participant awaits through the room's queue; it drops
everything else. On any other version rooms are left as the SDK made them, with a warning,
and tests/test_ffiroute.py fails.
"""

from __future__ import annotations

import logging

from livekit import rtc
from livekit.rtc._ffi_client import FfiClient
from livekit.rtc._proto import ffi_pb2 as proto_ffi

log = logging.getLogger("avatarq.ffiroute")

#: livekit-rtc versions whose Room event handling this module matches.
VERIFIED_SDK_VERSIONS = frozenset({"1.1.21", "1.2.0", "1.2.1"})
#: Callbacks a room forwards to its local participant's waiters; they carry no room handle,
#: and are rare, so every room keeps them.
_SHARED = frozenset({"publish_track", "unpublish_track"})


_warned = False


def verified() -> bool:
    """Whether the installed SDK is one the routing was verified on; warns once if not."""
    global _warned
    if rtc.__version__ in VERIFIED_SDK_VERSIONS:
        return True
    if not _warned:
        _warned = True
        log.warning(
            "livekit-rtc %s: FFI events are not routed per room (verified on %s)",
            rtc.__version__,
            ", ".join(sorted(VERIFIED_SDK_VERSIONS)),
        )
    return False


def route_own_events(room: rtc.Room) -> bool:
    """Narrow connected `room`'s FFI subscription to its own events; False (and the room
    untouched) on an SDK version this was not verified for."""
    if not verified():
        return False
    assert room._ffi_handle is not None
    handle = room._ffi_handle.handle
    participant = room.local_participant._ffi_handle.handle

    def own(event: proto_ffi.FfiEvent) -> bool:
        which = event.WhichOneof("message")
        if which == "room_event":
            return bool(event.room_event.room_handle == handle)
        if which == "rpc_method_invocation":
            return bool(event.rpc_method_invocation.local_participant_handle == participant)
        return which in _SHARED

    queue = FfiClient.instance.queue
    with queue._lock:
        for i, (subscribed, loop, _) in enumerate(queue._subscribers):
            if subscribed is room._ffi_queue:
                queue._subscribers[i] = (subscribed, loop, own)
                return True
    log.warning("room %s: its FFI subscription was not found; events not routed", room.name)
    return False
