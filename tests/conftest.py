# --- livekit_server fixture (owner: devstack/avatarq_dev/livekit_server) ---------------------
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
    #: "embedded" or "official"
    server: str = "embedded"


@_lk_pytest.fixture(scope="module", params=["embedded", "official"])
def livekit_server(
    request: _lk_pytest.FixtureRequest, tmp_path_factory: _lk_pytest.TempPathFactory
) -> _LkIterator[LiveKitServerInfo]:
    """The embedded server and the official livekit-server, each as a subprocess on loopback
    ports picked as it starts: the conformance tests hold the embedded one to the official one.

    Short empty-room timeout (2 s) so rooms left by one test do not linger. The official one
    is skipped only where it cannot run (no binary, outside the namespace) and CI is unset.
    """
    import os

    from avatarq_dev import livekit_official
    from avatarq_dev.stack import livekit_process

    if request.param == "official" and (missing := livekit_official.why_unavailable()):
        if os.environ.get("CI") == "true":
            _lk_pytest.fail(f"CI needs the official LiveKit server: {missing}")
        _lk_pytest.skip(f"official LiveKit server: {missing}")
    key, secret = "devkey", "secret"
    logs = tmp_path_factory.mktemp(f"livekit-{request.param}")
    proc = livekit_process(request.param, {key: secret}, logs, room_timeouts=(2, 2))
    with proc:
        url = f"ws://127.0.0.1:{proc.port}"
        yield LiveKitServerInfo(url, key, secret, str(proc.log_path), request.param)


# --- end livekit_server fixture ----------------------------------------------------------------


# --- redis fixture (owner: core pipeline) -----------------------------------------------------
@_lk_pytest.fixture(scope="session")
def redis_server() -> _LkIterator[str]:
    """A throwaway `redis-server` on a loopback port; yields its URL."""
    from avatarq_dev.processes import RedisServer

    with RedisServer() as server:
        yield server.url


# --- end redis fixture -------------------------------------------------------------------------


# --- rabbitmq fixture (owner: reliability) -------------------------------------------------------
@_lk_pytest.fixture(scope="session")
def rabbitmq_server(tmp_path_factory: _lk_pytest.TempPathFactory) -> _LkIterator[str]:
    """A throwaway `rabbitmq-server` (own node name, ports, data and epmd); yields its URL.
    Its `consumer_timeout` allows the default longest job (3600 s) plus 10 minutes."""
    from avatarq_dev.processes import RabbitMQServer

    data = tmp_path_factory.mktemp("rabbitmq")
    with RabbitMQServer(data_dir=data, consumer_timeout_s=4200, log_dir=data) as server:
        yield server.url


# --- end rabbitmq fixture ------------------------------------------------------------------------
