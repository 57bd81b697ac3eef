"""Every workaround for upstream behaviour, in one place, each with its upstream reference and
a test (tests/test_compat.py) that fails once upstream no longer needs it; then delete it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from kombu.transport import redis as kombu_redis
from redis.exceptions import ConnectionError as RedisConnectionError

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
