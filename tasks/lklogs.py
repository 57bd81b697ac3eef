"""Where the LiveKit SDK's native (Rust and libwebrtc) logs go.

The SDK starts its native library with log capture on: every native record, at every level,
crosses into Python as a protobuf batch that the FFI callback parses while holding the GIL,
only to drop most of it there (libwebrtc's DEBUG records unless LIVEKIT_RTC_DEBUG is set) or
at the `livekit` logger's level. RUST_LOG does not filter captured records. `avatarq bench`
counts about 700 records/s per stream doing nothing but streaming, and capture off saves about
a third of the sender's CPU (docs/performance.md). With capture off the native library logs
through its own env_logger to stderr, filtered at the source by RUST_LOG (errors only when
unset).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

_applied = False


class _InitWithoutLogCapture:
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
    global _applied
    if enabled or _applied:
        return
    from livekit.rtc import _ffi_client as ffi

    if ffi.FfiClient._instance is not None:  # the native library already started
        return
    get_lib: Callable[[], Any] = ffi.get_ffi_lib

    def get_lib_without_capture() -> Any:
        lib = get_lib()
        lib.livekit_ffi_initialize = _InitWithoutLogCapture(lib.livekit_ffi_initialize)
        return lib

    ffi.get_ffi_lib = get_lib_without_capture
    _applied = True
