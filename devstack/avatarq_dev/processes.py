"""Start local services as subprocesses on ports the OS picked, wait until they answer, stop
them: every service the demo, the tests and the benchmarks need runs as its own process.

A picked port may be taken before the service binds it, so a start whose service reports
`BIND_ERROR` is retried on new ports, and a service is ready only once it listens itself
(docs/development.md, ports)."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import psutil

PortKind = Literal["tcp", "udp"]
Ports = tuple[int, ...]
#: What a service logs when a port it was told is taken: Go, Python, redis-server and
#: werkzeug say "address already in use"; RabbitMQ "eaddrinuse" (AMQP port),
#: "dist_port_already_used" (Erlang distribution port) or "register/listen error" (its node
#: cannot register with an epmd that could not have the epmd port).
BIND_ERROR = re.compile(
    r"address already in use|eaddrinuse|dist_port_already_used|register/listen error",
    re.IGNORECASE,
)
#: Written to a service's log after a start of it that lost a port (infra/repeat-e2e counts them).
LOST_PORT = "avatarq_dev.processes: lost a port"
#: Starts on newly picked ports before giving up: each one loses only to a process that took
#: a port in the moment between its pick and the service's bind.
START_ATTEMPTS = 5


def _pick_ports(kinds: Sequence[PortKind]) -> Ports:
    """Distinct ports free on every address now, one per kind. ManagedProcess's own: a caller
    that binds the number later is the race this module exists to retry."""
    with contextlib.ExitStack() as held:
        ports = []
        for kind in kinds:
            kind_of = socket.SOCK_DGRAM if kind == "udp" else socket.SOCK_STREAM
            sock = held.enter_context(socket.socket(socket.AF_INET, kind_of))
            # Held until all are picked, so no two of a kind are the same port.
            sock.bind(("0.0.0.0", 0))
            ports.append(int(sock.getsockname()[1]))
        return tuple(ports)


class ServiceError(RuntimeError):
    """A local service did not start; the message carries the tail of its log."""


class ManagedProcess:
    """A subprocess whose output goes to a log file, started and stopped as a context manager.

    With `ports` (one kind each), its command is built for ports picked at start: `argv` and
    `env` may be functions of them, and it is ready once it listens on its first TCP port and
    `ready` (if given) says so; `prefer` is tried first (e.g. a port users know; 0: any), then
    picked ones. Without, `argv` and `env` are as given and `ready` decides. A restart keeps the
    ports of the first start: a restarted server keeps its address."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str] | Callable[[Ports], Sequence[str]],
        *,
        ready: Callable[[], bool] | None = None,
        env: Mapping[str, str] | Callable[[Ports], Mapping[str, str]] | None = None,
        ports: Sequence[PortKind] = (),
        prefer: Ports = (),
        log_dir: Path | None = None,
        start_timeout: float = 30.0,
        cwd: str | None = None,
    ) -> None:
        if ready is None and "tcp" not in ports:
            raise ValueError(f"{name}: a readiness check, or a TCP port to listen on, is needed")
        self.name = name
        self._argv = argv
        self._env = env or {}
        self._ready = ready
        self.port_kinds = tuple(ports)
        self.prefer = prefer
        self.ports: Ports = ()
        self.env: dict[str, str] = {}
        self._log_start = 0
        self.start_timeout = start_timeout
        self.cwd = cwd
        log_dir = log_dir or Path(tempfile.mkdtemp(prefix="avatarq-"))
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def port(self) -> int:
        """Its first port (picked by the first start)."""
        if not self.ports:
            raise ServiceError(f"{self.name} has no port before it is started")
        return self.ports[0]

    def _command(self, ports: Ports) -> tuple[list[str], dict[str, str]]:
        """The argv and the environment (on top of this process's) of a start on `ports`."""
        argv = self._argv(ports) if callable(self._argv) else self._argv
        env = self._env(ports) if callable(self._env) else self._env
        return list(argv), {**os.environ, **env}

    def start(self) -> ManagedProcess:
        """Start it and wait until it is ready; a process already running is left as it is
        (`with proc.start():` enters it once more, and a second start would orphan the
        first)."""
        if self.proc is not None and self.proc.poll() is None:
            return self
        if self.ports:  # a restart: its clients know its address
            if self._launch(self.ports):
                return self
            raise ServiceError(f"{self.name}: its ports {self.ports} were taken:\n{self.tail()}")
        try:
            for attempt in range(START_ATTEMPTS):
                ports = _pick_ports(self.port_kinds)
                if attempt == 0 and self.prefer:
                    ports = tuple(want or got for want, got in zip(self.prefer, ports, strict=True))
                if self._launch(ports):
                    return self
        except ServiceError:
            self.ports = ()
            raise
        self.ports = ()
        raise ServiceError(
            f"{self.name}: its ports were taken on {START_ATTEMPTS} starts:\n{self.tail()}"
        )

    def _launch(self, ports: Ports) -> bool:
        """One start on `ports` (`self.ports` meanwhile): True once ready, False when it lost
        a port (stopped then, and `LOST_PORT` added to its log); ServiceError when it fails
        otherwise."""
        self.ports = ports
        argv, self.env = self._command(ports)
        self._log_start = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=self.cwd
            )
        if self._ready_or_lost(ports):
            return True
        self.stop(timeout=0)  # it serves nothing, and may linger (livekit-server does)
        with open(self.log_path, "a") as log:
            log.write(f"\n{LOST_PORT}: one of {ports} was taken\n")
        return False

    def _ready_or_lost(self, ports: Ports) -> bool:
        assert self.proc is not None
        first_tcp = next(
            (p for p, k in zip(ports, self.port_kinds, strict=True) if k == "tcp"), None
        )
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            # Whether it exited before reading its log: what it wrote before exiting is there.
            exited = self.proc.poll() is not None
            if ports and BIND_ERROR.search(self._log()):
                return False
            if exited:
                self.stop()  # what it started (RabbitMQ's epmd) may outlive it
                raise ServiceError(
                    f"{self.name} exited with {self.proc.returncode}:\n{self.tail()}"
                )
            if self._ready is None:
                if first_tcp is not None and self.listens(first_tcp):
                    return True
            elif self._ready():
                # Ready by its own account, yet not on its port: another process has it, and
                # it said nothing (a Celery worker's metrics server fails before its logging).
                return first_tcp is None or self.listens(first_tcp)
            time.sleep(0.05)
        self.stop()
        raise ServiceError(f"{self.name} not ready after {self.start_timeout:.0f}s:\n{self.tail()}")

    def listens(self, port: int) -> bool:
        """Whether this process, or one it started, listens on TCP `port` (a connection to
        the port could reach another process that took it)."""
        if self.proc is None or self.proc.poll() is not None:
            return False
        try:
            root = psutil.Process(self.proc.pid)
            procs = [root, *root.children(recursive=True)]
            return any(
                conn.status == psutil.CONN_LISTEN and conn.laddr.port == port
                for proc in procs
                for conn in proc.net_connections("tcp")
            )
        except psutil.Error:  # it or a child just exited
            return False

    def _log(self) -> str:
        """What the current start wrote (the file keeps earlier ones', e.g. a lost start's)."""
        try:
            with open(self.log_path, "rb") as log:
                log.seek(self._log_start)
                return log.read().decode(errors="replace")
        except OSError:
            return ""

    def tail(self, lines: int = 40) -> str:
        """The last `lines` of the current start's log: a log-based readiness check must not
        see an earlier start's "ready"."""
        return "\n".join(self._log().splitlines()[-lines:])

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM; SIGKILL to it and to what it started if still running after `timeout`
        seconds, or at once with 0."""
        if self.proc is None or self.proc.poll() is not None:
            return
        if timeout > 0:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
                return
            except subprocess.TimeoutExpired:
                pass
        with contextlib.suppress(psutil.Error):
            for child in psutil.Process(self.proc.pid).children(recursive=True):
                child.kill()
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
    """A `redis-server` on a loopback port. Without `data_dir` it keeps nothing on disk;
    with one it keeps redis-server's own default persistence there (RDB snapshots, written
    at shutdown, none on a crash), plus an append-only file when `aof`."""

    def __init__(
        self, *, log_dir: Path | None = None, data_dir: Path | None = None, aof: bool = False
    ) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise ServiceError("redis-server not found on PATH; run infra/bootstrap to install it")
        if data_dir is None:
            keep = ["--save", "", "--appendonly", "no"]
        else:
            data_dir.mkdir(parents=True, exist_ok=True)
            keep = ["--dir", str(data_dir), *(["--appendonly", "yes"] if aof else [])]
        super().__init__(
            "redis",
            lambda ports: [binary, "--port", str(ports[0]), "--bind", "127.0.0.1", *keep],
            ports=["tcp"],
            log_dir=log_dir,
        )

    @property
    def url(self) -> str:
        return self.db_url(0)

    def db_url(self, db: int) -> str:
        """The URL of database `db` on this server (the stack uses 0)."""
        return f"redis://127.0.0.1:{self.port}/{db}"


#: Where Debian's rabbitmq-server package keeps the server script itself (/usr/sbin's wrapper
#: would switch to the `rabbitmq` user and the system's data directory).
RABBITMQ_SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server"


class RabbitMQServer(ManagedProcess):
    """A throwaway `rabbitmq-server` (Debian's package) on loopback ports (AMQP, Erlang
    distribution, epmd), with its own node name, data, logs and epmd, so it never meets a
    system instance.

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
        data_dir.mkdir(parents=True, exist_ok=True)
        (data_dir / "enabled_plugins").write_text("[].\n")
        self.data_dir = data_dir
        self.consumer_timeout_s = consumer_timeout_s
        super().__init__(
            "rabbitmq",
            [RABBITMQ_SERVER],
            ready=self._accepts_amqp,
            env=self._env_for,
            ports=["tcp", "tcp", "tcp"],
            log_dir=log_dir,
            start_timeout=90.0,
        )

    def _env_for(self, ports: Ports) -> dict[str, str]:
        amqp, dist, epmd = ports
        conf = self.data_dir / "rabbitmq.conf"
        conf.write_text(
            f"listeners.tcp.default = 127.0.0.1:{amqp}\n"
            f"consumer_timeout = {int(self.consumer_timeout_s * 1000)}\n"
            "management_agent.disable_metrics_collector = true\n"
        )
        return {
            "HOME": str(self.data_dir),  # the Erlang cookie lives here
            "RABBITMQ_NODENAME": f"avatarq-{amqp}@localhost",
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(amqp),
            "RABBITMQ_DIST_PORT": str(dist),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "ERL_EPMD_PORT": str(epmd),
            "RABBITMQ_CONFIG_FILE": str(conf),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.data_dir / "enabled_plugins"),
            "RABBITMQ_MNESIA_BASE": str(self.data_dir / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.data_dir / "log"),
            "RABBITMQ_PID_FILE": str(self.data_dir / "rabbitmq.pid"),
            "RABBITMQ_LOGS": "-",  # to stdout, that is our log file
            # Not the working directory: a start that lost a port writes one.
            "ERL_CRASH_DUMP": str(self.data_dir / "erl_crash.dump"),
        }

    def _accepts_amqp(self) -> bool:
        # The port opens before the broker accepts logins; ask for a real AMQP connection.
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
        # Erlang starts an epmd for the node, detached (not our child), which outlives the
        # broker: ours is the one with this start's epmd port and home in its environment.
        port = self.env.get("ERL_EPMD_PORT")
        if port is None:  # never started
            return
        ours = (port, self.env["HOME"])
        for proc in psutil.process_iter(["name", "environ"]):
            env = proc.info["environ"] or {}
            if proc.info["name"] == "epmd" and (env.get("ERL_EPMD_PORT"), env.get("HOME")) == ours:
                with contextlib.suppress(psutil.Error):
                    proc.kill()

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}//"


def python_module(
    name: str,
    module: str,
    args: Sequence[str] | Callable[[Ports], Sequence[str]],
    *,
    python: str | None = None,
    **kw: Any,
) -> ManagedProcess:
    """`python -m module args...` with this interpreter (or `python`); `args` may be a
    function of the ports (`ports=` as for ManagedProcess)."""

    def argv(ports: Ports) -> list[str]:
        exe = python or sys.executable
        return [exe, "-m", module, *(args(ports) if callable(args) else args)]

    return ManagedProcess(name, argv, **kw)
