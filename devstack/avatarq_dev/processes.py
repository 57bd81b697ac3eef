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
        """Start it and wait until it is ready; a process already running is left as it is
        (`with proc.start():` enters it once more, and a second start would orphan the
        first)."""
        if self.proc is not None and self.proc.poll() is None:
            return self
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
    """A `redis-server` on a free loopback port. Without `data_dir` it keeps nothing on disk;
    with one it keeps redis-server's own default persistence there (RDB snapshots, written
    at shutdown, none on a crash), plus an append-only file when `aof`."""

    def __init__(
        self,
        port: int | None = None,
        *,
        log_dir: Path | None = None,
        data_dir: Path | None = None,
        aof: bool = False,
    ) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise ServiceError("redis-server not found on PATH; run infra/bootstrap to install it")
        self.port = port or free_port()
        argv = [binary, "--port", str(self.port), "--bind", "127.0.0.1"]
        if data_dir is None:
            argv += ["--save", "", "--appendonly", "no"]
        else:
            data_dir.mkdir(parents=True, exist_ok=True)
            argv += ["--dir", str(data_dir), *(["--appendonly", "yes"] if aof else [])]
        super().__init__(
            "redis",
            argv,
            ready=tcp_ready("127.0.0.1", self.port),
            log_dir=log_dir,
        )

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"


#: Where Debian's rabbitmq-server package keeps the server script itself (/usr/sbin's wrapper
#: would switch to the `rabbitmq` user and the system's data directory).
RABBITMQ_SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server"


class RabbitMQServer(ManagedProcess):
    """A throwaway `rabbitmq-server` (Debian's package) on free loopback ports, with its own
    node name, data, logs and epmd, so it never meets a system instance.

    `consumer_timeout_s` must allow the longest job: RabbitMQ closes the channel of a consumer
    that holds a message unacknowledged for longer (30 minutes by default), and jobs are
    acknowledged only when they end."""

    def __init__(
        self, *, data_dir: Path, consumer_timeout_s: float, log_dir: Path | None = None
    ) -> None:
        if not os.path.exists(RABBITMQ_SERVER):
            raise ServiceError(
                "rabbitmq-server is not installed: run infra/bootstrap (it apt-installs it)"
            )
        self.port = free_port()
        data_dir.mkdir(parents=True, exist_ok=True)
        conf = data_dir / "rabbitmq.conf"
        conf.write_text(
            f"listeners.tcp.default = 127.0.0.1:{self.port}\n"
            f"consumer_timeout = {int(consumer_timeout_s * 1000)}\n"
            "management_agent.disable_metrics_collector = true\n"
        )
        (data_dir / "enabled_plugins").write_text("[].\n")
        env = {
            "HOME": str(data_dir),  # the Erlang cookie lives here
            "RABBITMQ_NODENAME": f"avatarq-{self.port}@localhost",
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(free_port()),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "ERL_EPMD_PORT": str(free_port()),
            "RABBITMQ_CONFIG_FILE": str(conf),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(data_dir / "enabled_plugins"),
            "RABBITMQ_MNESIA_BASE": str(data_dir / "mnesia"),
            "RABBITMQ_LOG_BASE": str(data_dir / "log"),
            "RABBITMQ_PID_FILE": str(data_dir / "rabbitmq.pid"),
            "RABBITMQ_LOGS": "-",  # to stdout, that is our log file
        }
        super().__init__(
            "rabbitmq",
            [RABBITMQ_SERVER],
            ready=self._accepts_amqp,
            env=env,
            log_dir=log_dir,
            start_timeout=90.0,
        )

    def _accepts_amqp(self) -> bool:
        # The port opens before the broker accepts logins; ask for a real AMQP connection.
        if not tcp_ready("127.0.0.1", self.port)():
            return False
        from kombu import Connection

        try:
            with Connection(self.url, connect_timeout=1) as conn:
                conn.ensure_connection(max_retries=1)
            return True
        except Exception:
            return False

    def stop(self, timeout: float = 30.0) -> None:
        super().stop(timeout)
        self._stop_epmd()

    def _stop_epmd(self) -> None:
        # Erlang starts an epmd for the node, which outlives the broker; ours has its own port.
        epmd = shutil.which("epmd")
        if epmd:
            subprocess.run(
                [epmd, "-kill"], env=self.env, capture_output=True, timeout=10, check=False
            )

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}//"


def python_module(
    name: str, module: str, args: Sequence[str], *, ready: Callable[[], bool], **kw: object
) -> ManagedProcess:
    """`python -m module args...` with this interpreter."""
    return ManagedProcess(name, [sys.executable, "-m", module, *args], ready=ready, **kw)  # type: ignore[arg-type]
