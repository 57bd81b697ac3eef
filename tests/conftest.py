# --- livekit_server fixture (owner: avatarq/dev/livekit_server) -------------------------------
import dataclasses as _lk_dataclasses
from collections.abc import Iterator as _LkIterator

import pytest as _lk_pytest


@_lk_dataclasses.dataclass(frozen=True)
class LiveKitServerInfo:
    """A running dev LiveKit server: `url` for rtc.Room.connect and LiveKitAPI."""

    url: str
    api_key: str
    api_secret: str
    log_path: str


@_lk_pytest.fixture(scope="module")
def livekit_server() -> _LkIterator[LiveKitServerInfo]:
    """`python -m avatarq.dev.livekit_server` as a subprocess on a free loopback port.

    Short empty-room timeout (2 s) so rooms left by one test do not linger.
    """
    from avatarq.dev.processes import free_port, python_module, tcp_ready

    port = free_port()
    key, secret = "devkey", "secret"
    proc = python_module(
        "livekit-server",
        "avatarq.dev.livekit_server",
        [
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--keys",
            f"{key}: {secret}",
            "--empty-timeout",
            "2",
        ],
        ready=tcp_ready("127.0.0.1", port),
    )
    with proc:
        yield LiveKitServerInfo(f"ws://127.0.0.1:{port}", key, secret, str(proc.log_path))


# --- end livekit_server fixture ----------------------------------------------------------------


# --- redis fixture (owner: core pipeline) -----------------------------------------------------
@_lk_pytest.fixture(scope="session")
def redis_server() -> _LkIterator[str]:
    """A throwaway `redis-server` on a free loopback port; yields its URL."""
    from avatarq.dev.processes import RedisServer

    with RedisServer() as server:
        yield server.url


# --- end redis fixture -------------------------------------------------------------------------


# --- rabbitmq fixture (owner: reliability) -------------------------------------------------------
@_lk_pytest.fixture(scope="session")
def rabbitmq_server(tmp_path_factory: _lk_pytest.TempPathFactory) -> _LkIterator[str]:
    """A throwaway `rabbitmq-server` (own node name, ports, data and epmd); yields its URL.
    Its `consumer_timeout` allows the default longest job (3600 s) plus 10 minutes."""
    from avatarq.dev.processes import RabbitMQServer

    data = tmp_path_factory.mktemp("rabbitmq")
    with RabbitMQServer(data_dir=data, consumer_timeout_s=4200, log_dir=data) as server:
        yield server.url


# --- end rabbitmq fixture ------------------------------------------------------------------------
