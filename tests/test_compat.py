"""Each upstream workaround of tasks/compat.py is still needed: these fail once upstream no
longer behaves the way the workaround answers, and then the workaround goes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from kombu import Connection
from redis.exceptions import ConnectionError as RedisConnectionError

from tasks import compat

ROOT = Path(__file__).resolve().parents[1]


def test_kombu_still_reads_the_detached_connection_of_a_collected_channel(
    redis_server: str,
) -> None:
    # What a worker meets when the broker connection breaks: Celery collects the connection,
    # then closes its channels, and restoring their unacked jobs reads the connection.
    connection = Connection(redis_server)
    channel = connection.channel()
    connection.collect()
    with pytest.raises(AttributeError):
        compat.KOMBU_CONNPARAMS(channel)
    # The guard turns that into the connection error kombu and Celery handle.
    compat.guard_detached_redis_channels()
    with pytest.raises(RedisConnectionError):
        channel._connparams()


def test_the_sdk_still_starts_its_native_library_with_log_capture_on() -> None:
    # In a fresh interpreter: the FFI client is one per process.
    probe = """
import json
from livekit.rtc import _ffi_client as ffi
from tasks import compat
seen = []
call = compat.InitWithoutLogCapture.__call__
def spy(self, callback, capture, *rest):
    seen.append(capture)
    return call(self, callback, capture, *rest)
compat.InitWithoutLogCapture.__call__ = spy
compat.capture_native_logs(False)
ffi.FfiClient.instance
print(json.dumps(seen))
"""
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr[-2000:]
    # The SDK asked for capture (True); without it the workaround has nothing left to do.
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [True]
