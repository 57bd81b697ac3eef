"""Every workaround for upstream behaviour, in one place, each with its upstream reference and
a test (tests/test_compat.py) that fails once upstream no longer needs it; then delete it."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from kombu.transport import redis as kombu_redis
from livekit import rtc
from livekit.rtc._ffi_client import FfiClient
from livekit.rtc._proto import ffi_pb2 as proto_ffi
from redis.exceptions import ConnectionError as RedisConnectionError

log = logging.getLogger("avatarq.compat")

# --- kombu: a Redis restart must not kill every worker that holds jobs ----------------------
# Since celery/celery#10302 ("worker stops consuming after broker connection reset"), celery
# 5.7 with kombu 5.7 closes a broken broker connection after `Connection.collect()`, which has
# already detached the channels' transport. Closing a channel that holds unacknowledged jobs
# then restores them through `Channel._connparams`, which reads the detached connection: an
# AttributeError Celery treats as fatal, and the worker exits. No setting avoids it. Such a
# channel raises a connection error instead, which kombu and Celery handle: the restore is
# skipped (the messages stay in Redis's unacked set; tasks/recovery.py or the visibility
# timeout hands them back, the ledger drops copies of jobs that ended) and a late ack is
# logged as "Couldn't ack".

#: kombu's own `_connparams`, kept for the test that shows it still needs the guard.
KOMBU_CONNPARAMS: Callable[..., dict[str, Any]] = kombu_redis.Channel._connparams


def guard_detached_redis_channels() -> None:
    if getattr(kombu_redis.Channel._connparams, "avatarq_guard", False):
        return

    def guarded(self: kombu_redis.Channel, asynchronous: bool = False) -> dict[str, Any]:
        transport = getattr(self, "connection", None)
        if transport is None or transport.client is None:
            raise RedisConnectionError("broker channel of a closed connection")
        return KOMBU_CONNPARAMS(self, asynchronous=asynchronous)

    guarded.avatarq_guard = True  # type: ignore[attr-defined]
    kombu_redis.Channel._connparams = guarded  # type: ignore[method-assign]


# --- livekit-rtc: the native library's logs stay out of Python ------------------------------
# livekit-rtc (1.1.x) starts its native library with log capture on
# (`livekit_ffi_initialize(callback, True, ...)` in livekit/rtc/_ffi_client.py): every Rust and
# libwebrtc record, at every level, crosses into Python as a protobuf batch parsed under the
# GIL, only to be dropped there or at the `livekit` logger's level; RUST_LOG does not filter
# captured records. `avatarq bench` counts about 700 records/s per stream that only streams,
# and capture off saves about a third of the sender's CPU (docs/performance.md). With capture
# off the native library logs through its own env_logger to stderr, filtered by RUST_LOG.

_capture_decided = False


class InitWithoutLogCapture:
    """`livekit_ffi_initialize(callback, capture_logs, sdk, version)` with capture_logs
    forced off; `argtypes` passes through (FfiClient sets it before the call)."""

    def __init__(self, fn: Any) -> None:
        self._fn = fn

    @property
    def argtypes(self) -> Any:
        return self._fn.argtypes

    @argtypes.setter
    def argtypes(self, value: Any) -> None:
        self._fn.argtypes = value

    def __call__(self, callback: Any, _capture_logs: bool, *rest: Any) -> Any:
        return self._fn(callback, False, *rest)


def capture_native_logs(enabled: bool) -> None:
    """Keep the SDK's default (`enabled`) or start its native library without log capture.
    Decided once per process, before the SDK's first use; later calls change nothing."""
    global _capture_decided
    if enabled or _capture_decided:
        return
    from livekit.rtc import _ffi_client as ffi

    if ffi.FfiClient._instance is not None:  # the native library already started
        return
    get_lib: Callable[[], Any] = ffi.get_ffi_lib

    def get_lib_without_capture() -> Any:
        lib = get_lib()
        lib.livekit_ffi_initialize = InitWithoutLogCapture(lib.livekit_ffi_initialize)
        return lib

    ffi.get_ffi_lib = get_lib_without_capture
    _capture_decided = True


# --- livekit-rtc: each room gets only its own FFI events ------------------------------------
# The SDK hands every FFI event (each write's completion, each room event of any room) to
# every `rtc.Room` of the process: a `call_soon_threadsafe` per room, then each room's listen
# task wakes and passes the event through its own broadcast queue, awaiting it there, whether
# or not it is the room's: O(N) per event with N rooms, O(N²) per second. Narrowing each
# room's subscription to its own events removes that term (docs/performance.md). It reaches
# into the SDK's private subscriber list, so it runs only on the versions whose
# `Room._listen_task` was read for it (docs/compatibility.md): there a room consumes its own
# `room_event`s, its local participant's `rpc_method_invocation`s, and the `publish_track` /
# `unpublish_track` callbacks its participant awaits through the room's queue. On any other
# version rooms are left as the SDK made them, with a warning, and tests/test_ffiroute.py
# fails.

#: livekit-rtc versions whose Room event handling the routing matches.
VERIFIED_SDK_VERSIONS = frozenset({"1.1.21", "1.2.0", "1.2.1"})
#: Callbacks a room forwards to its local participant's waiters; they carry no room handle,
#: and are rare, so every room keeps them.
_SHARED = frozenset({"publish_track", "unpublish_track"})

_warned = False


def routing_verified() -> bool:
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
    if not routing_verified():
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
