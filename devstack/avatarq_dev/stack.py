"""The embedded local stack: Redis, the local LiveKit server, the avatar emulator and Celery
workers, each its own process on loopback ports picked as it starts. Used by `avatarq demo`,
the tests and the benchmarks.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from avatarq_dev import livekit_official
from avatarq_dev.processes import (
    ManagedProcess,
    Ports,
    RabbitMQServer,
    RedisServer,
    ServiceError,
    python_module,
)

DEV_API_KEY = "devkey"
#: 32 bytes or more: PyJWT warns about a shorter HMAC key (RFC 7518) on every worker's first job.
DEV_API_SECRET = "avatarq-local-stack-secret-0123456789"
DEV_LICENSE_KEY = "local-dev-license"
HOST = "127.0.0.1"
#: The interpreter that runs the avatar emulator, when not this one: one with the dev stack's
#: `emulator` extra (livekit-agents), e.g. while the worker runs a livekit SDK that
#: livekit-agents does not accept (docs/compatibility.md).
EMULATOR_PYTHON_ENV = "AVATARQ_DEV_EMULATOR_PYTHON"


def emulator_python() -> str:
    """The interpreter for the avatar emulator: $AVATARQ_DEV_EMULATOR_PYTHON, else this one,
    which must then have livekit-agents."""
    chosen = os.environ.get(EMULATOR_PYTHON_ENV, "").strip()
    if chosen:
        if not os.access(chosen, os.X_OK):
            raise ServiceError(f"{EMULATOR_PYTHON_ENV}={chosen} is not an executable")
        return chosen
    if importlib.util.find_spec("livekit.agents") is None:
        raise ServiceError(
            "the avatar emulator needs livekit-agents (pip install './devstack[emulator]'), "
            f"or {EMULATOR_PYTHON_ENV} naming an interpreter that has it"
        )
    return sys.executable


@dataclass
class LocalStack:
    workdir: Path
    redis: RedisServer
    livekit: ManagedProcess
    avatar: ManagedProcess
    api_secret: str
    license_key: str
    #: Which LiveKit server runs: "official" (livekit-server) or "embedded" (ours).
    server: str = "embedded"
    workers: list[ManagedProcess] = field(default_factory=list)
    #: Each worker's metrics port, by name (when it serves metrics).
    metrics_ports: dict[str, int] = field(default_factory=dict)
    #: The broker when it is not Redis (Redis then keeps results, events and the ledger).
    rabbitmq: RabbitMQServer | None = None

    @property
    def livekit_port(self) -> int:
        return self.livekit.port

    @property
    def avatar_port(self) -> int:
        return self.avatar.port

    @property
    def livekit_url(self) -> str:
        return f"ws://{HOST}:{self.livekit_port}"

    @property
    def avatar_url(self) -> str:
        return f"http://{HOST}:{self.avatar_port}"

    @property
    def recordings(self) -> Path:
        return self.workdir / "recordings"

    def env(self) -> dict[str, str]:
        """The settings (environment) that point workers and producers at this stack."""
        return {
            "LIVEKIT_URL": self.livekit_url,
            "LIVEKIT_API_KEY": DEV_API_KEY,
            "LIVEKIT_API_SECRET": self.api_secret,
            "AVALUMA_API_URL": self.avatar_url,
            "AVALUMA_LICENSE_KEY": self.license_key,
            "REDIS_URL": self.redis.url,
            **({"CELERY_BROKER_URL": self.rabbitmq.url} if self.rabbitmq else {}),
            # Local development serves audio from this machine.
            "AVATARQ_ALLOW_PRIVATE_SOURCES": "true",
            # Jobs with `record: true` keep their MP4 here (docs/recordings.md).
            "AVATARQ_RECORDINGS": str(self.workdir / "videos"),
        }

    @contextlib.contextmanager
    def current(self, extra: dict[str, str] | None = None) -> Iterator[LocalStack]:
        """Point this process's settings (producers, `get_settings()`) at the stack for the
        block, with `extra` settings on top; restores the environment after."""
        from avatarq.settings import get_settings

        saved = dict(os.environ)
        os.environ.update({**self.env(), **(extra or {})})
        get_settings.cache_clear()
        try:
            yield self
        finally:
            os.environ.clear()
            os.environ.update(saved)
            get_settings.cache_clear()

    def start_worker(
        self,
        name: str = "w1",
        *,
        concurrency: int | None = 8,
        extra_env: dict[str, str] | None = None,
        pool: str | None = None,
    ) -> ManagedProcess:
        """A real `celery -A tasks worker` process on this stack, with its own metrics port
        (`metrics_ports[name]`) unless `extra_env` sets one; `pool` overrides the configured
        threads pool (e.g. the benchmark's `prefork` baseline); `concurrency` None leaves
        the worker's own (`AVATARQ_WORKER_CONCURRENCY`)."""
        extra_env = extra_env or {}
        serves_metrics = "AVATARQ_METRICS_PORT" not in extra_env

        def env(ports: Ports) -> dict[str, str]:
            metrics = {"AVATARQ_METRICS_PORT": str(ports[0])} if serves_metrics else {}
            return {**self.env(), **metrics, **extra_env}

        proc = ManagedProcess(
            f"worker-{name}",
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "tasks",
                "worker",
                "--loglevel",
                "INFO",
                *(["--concurrency", str(concurrency)] if concurrency else []),
                "--hostname",
                f"{name}@%h",
                "--without-gossip",
                "--without-mingle",
                *(["--pool", pool] if pool else []),
            ],
            ready=lambda: " ready." in proc.tail(200),
            env=env,
            # A metrics port taken before the worker bound it fails before Celery's logging:
            # the worker says " ready." without listening there, and is started again.
            ports=["tcp"] if serves_metrics else [],
            log_dir=self.workdir / "logs",
            start_timeout=60,
        )
        proc.start()
        if serves_metrics:
            self.metrics_ports[name] = proc.port
        self.workers.append(proc)
        return proc

    def stop(self) -> None:
        for proc in [*self.workers, self.avatar, self.livekit, self.redis, self.rabbitmq]:
            if proc is not None:
                proc.stop()


@contextlib.contextmanager
def local_stack(
    workdir: Path | None = None,
    *,
    workers: int = 0,
    concurrency: int = 8,
    persistent: bool = False,
    api_secret: str | None = None,
    license_key: str | None = None,
    room_timeouts: tuple[int, int] | None = None,
    broker: Literal["redis", "rabbitmq"] = "redis",
    consumer_timeout_s: float = 4200.0,
    livekit_redis: bool = False,
) -> Iterator[LocalStack]:
    """Start the whole stack (and `workers` Celery workers); stop everything on exit.
    `persistent` gives Redis a data directory with redis-server's own default persistence
    (RDB snapshots, saved at shutdown), so it can be restarted as a user's would.
    The LiveKit server is the official one where it can run (`livekit_official.choice`);
    `room_timeouts` (empty, departure seconds) replaces its room defaults (300 s / 20 s).
    `broker="rabbitmq"` adds a RabbitMQ server as the broker, with `consumer_timeout_s`
    (default: the default longest job plus 10 minutes). `livekit_redis` has the official
    server keep its state in the stack's Redis, as LiveKit Egress needs (avatarq_dev.egress)."""
    server = livekit_official.choice()
    api_secret = api_secret or DEV_API_SECRET
    license_key = license_key or DEV_LICENSE_KEY
    workdir = workdir or Path(tempfile.mkdtemp(prefix="avatarq-stack-"))
    logs = workdir / "logs"
    redis = RedisServer(log_dir=logs, data_dir=workdir / "redis" if persistent else None)
    if livekit_redis and server != "official":
        raise ServiceError("LiveKit Egress needs the official livekit-server (AVATARQ_DEV_LIVEKIT)")
    livekit = livekit_process(
        server,
        {DEV_API_KEY: api_secret},
        logs,
        room_timeouts=room_timeouts,
        redis=redis if livekit_redis else None,
    )
    avatar = python_module(
        "avatar",
        "avatarq_dev.avatar_emulator",
        lambda ports: [
            "--host",
            HOST,
            "--port",
            str(ports[0]),
            "--license-key",
            license_key,
            "--record-dir",
            str(workdir / "recordings"),
            # The embedded server forwards no media, so no subscription would ever release
            # an AvatarRunner's video there.
            "--publish",
            "runner" if server == "official" else "video_only",
        ],
        python=emulator_python(),
        ports=["tcp"],
        log_dir=logs,
    )
    stack = LocalStack(workdir, redis, livekit, avatar, api_secret, license_key, server)
    if broker == "rabbitmq":
        stack.rabbitmq = RabbitMQServer(
            data_dir=workdir / "rabbitmq", consumer_timeout_s=consumer_timeout_s, log_dir=logs
        )
    try:
        for proc in (redis, livekit, avatar, stack.rabbitmq):
            if proc is not None:
                proc.start()
        for i in range(workers):
            stack.start_worker(f"w{i + 1}", concurrency=concurrency)
        yield stack
    finally:
        stack.stop()


def livekit_process(
    server: str,
    keys: dict[str, str],
    log_dir: Path,
    *,
    room_timeouts: tuple[int, int] | None = None,
    redis: RedisServer | None = None,
) -> ManagedProcess:
    """The chosen LiveKit server, not started yet (its `port` is picked as it starts); with
    `redis`, the official one keeps its state there."""
    empty, departure = room_timeouts or (None, None)
    if server == "official":
        return livekit_official.official_server(
            keys=keys,
            log_dir=log_dir,
            empty_timeout_s=empty,
            departure_timeout_s=departure,
            redis=redis,
        )
    args = ["--host", HOST, "--keys", ", ".join(f"{k}: {v}" for k, v in keys.items())]
    if empty is not None:
        args += ["--empty-timeout", str(empty)]
    return python_module(
        "livekit",
        "avatarq_dev.livekit_server",
        lambda ports: [*args, "--port", str(ports[0])],
        ports=["tcp"],
        log_dir=log_dir,
    )
