"""Loopback ports nothing answers on, for tests of unreachable servers.

A number from a socket that was let go could be taken by any server meanwhile, and the test
would meet it; this socket stays bound, without listening, so connections to it are refused
and nothing else can bind its port while it is held.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator


@contextlib.contextmanager
def refused_port() -> Iterator[int]:
    """A port that refuses connections until the block ends."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield int(sock.getsockname()[1])
