"""Start local services as subprocesses on free ports, wait until they answer, stop them.

Used by the demo, the tests and the benchmarks: every service they need (Redis, the local
LiveKit server, the avatar emulator, Celery workers) runs as its own process, never on the
caller's event loop.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def tcp_ready(host: str, port: int) -> Callable[[], bool]:
    def check() -> bool:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return True
        except OSError:
            return False

    return check


class ServiceError(RuntimeError):
    """A local service did not start; the message carries the tail of its log."""


class ManagedProcess:
    """A subprocess whose output goes to a log file, started and stopped as a context manager."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        ready: Callable[[], bool],
        env: dict[str, str] | None = None,
        log_dir: Path | None = None,
        start_timeout: float = 30.0,
        cwd: str | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.ready = ready
        self.env = {**os.environ, **(env or {})}
        self.start_timeout = start_timeout
        self.cwd = cwd
        log_dir = log_dir or Path(tempfile.mkdtemp(prefix="avatarq-"))
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> ManagedProcess:
        log = open(self.log_path, "ab")  # noqa: SIM115 - lives as long as the process
        self.proc = subprocess.Popen(
            self.argv, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=self.cwd
        )
        log.close()
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServiceError(
                    f"{self.name} exited with {self.proc.returncode}:\n{self.tail()}"
                )
            if self.ready():
                return self
            time.sleep(0.05)
        self.stop()
        raise ServiceError(f"{self.name} not ready after {self.start_timeout:.0f}s:\n{self.tail()}")

    def tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)

    def __enter__(self) -> ManagedProcess:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class RedisServer(ManagedProcess):
    """A throwaway `redis-server` on a free loopback port, keeping nothing on disk."""

    def __init__(
        self, port: int | None = None, *, log_dir: Path | None = None, data_dir: Path | None = None
    ) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise ServiceError("redis-server not found on PATH; run infra/bootstrap to install it")
        self.port = port or free_port()
        argv = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        if data_dir is None:
            argv += ["--appendonly", "no"]
        else:
            # Append-only file: queued jobs survive a restart, as in production.
            data_dir.mkdir(parents=True, exist_ok=True)
            argv += ["--appendonly", "yes", "--dir", str(data_dir)]
        super().__init__(
            "redis",
            argv,
            ready=tcp_ready("127.0.0.1", self.port),
            log_dir=log_dir,
        )

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"


def python_module(
    name: str, module: str, args: Sequence[str], *, ready: Callable[[], bool], **kw: object
) -> ManagedProcess:
    """`python -m module args...` with this interpreter."""
    return ManagedProcess(name, [sys.executable, "-m", module, *args], ready=ready, **kw)  # type: ignore[arg-type]
