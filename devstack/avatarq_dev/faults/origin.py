"""A slow HTTP origin for the fault lab: serves one file at a multiple of real time and goes
dark once, for a while, part-way through (what a struggling CDN or TTS stream looks like).

No ranges, no keep-alive: every request streams the file from its first byte, paced.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

#: Bytes written per pacing step.
_STEP_BYTES = 3200


@dataclass
class Darkness:
    """Once any response reaches `at_byte`, every response sends nothing for `seconds`."""

    at_byte: int
    seconds: float
    began: float | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def wait_out(self, sent: int) -> None:
        with self._lock:
            if self.began is None and sent >= self.at_byte:
                self.began = time.monotonic()
            began = self.began
        if began is not None:
            time.sleep(max(0.0, began + self.seconds - time.monotonic()))


class _Handler(BaseHTTPRequestHandler):
    def __init__(self, *args: object, data: bytes, rate: float, dark: Darkness) -> None:
        self.data, self.rate, self.dark = data, rate, dark
        super().__init__(*args)  # type: ignore[arg-type]

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "audio/wav")
        self.send_header("Content-Length", str(len(self.data)))
        self.end_headers()
        t0 = time.monotonic()
        with contextlib.suppress(OSError):  # the decoder hung up
            for sent in range(0, len(self.data), _STEP_BYTES):
                self.dark.wait_out(sent)
                delay = t0 + sent / self.rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                self.wfile.write(self.data[sent : sent + _STEP_BYTES])
                self.wfile.flush()

    def log_message(self, format: str, *args: object) -> None:
        pass


@contextlib.contextmanager
def slow_origin(path: Path, *, bytes_per_second: float, dark: Darkness) -> Iterator[str]:
    """Serve `path` at `bytes_per_second` with `dark`; yields its URL."""
    handler = partial(_Handler, data=path.read_bytes(), rate=bytes_per_second, dark=dark)
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/{path.name}"
    finally:
        server.shutdown()
        server.server_close()
