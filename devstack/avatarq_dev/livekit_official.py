"""The official livekit-server (Go, built by infra/bootstrap) as a managed local process.

It runs in `--dev` mode inside the project's network namespace, announcing the namespace's
veth address as its ICE candidate (libwebrtc ignores loopback ones). `AVATARQ_DEV_LIVEKIT`
picks the stack's server: `auto`, `official` or `embedded` (docs/development.md)."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

from avatarq_dev.processes import ManagedProcess, Ports, RedisServer, ServiceError

#: The version infra/bootstrap builds; the compose file pins the same image.
VERSION = "v1.13.5"
BINARY_NAME = "livekit-server"
#: Where infra/netns-run puts its veth address (CIDR).
NETNS_ADDR_ENV = "AVATARQ_NETNS_ADDR"
CHOICE_ENV = "AVATARQ_DEV_LIVEKIT"
HOST = "127.0.0.1"


def binary() -> str | None:
    """The official server's binary: beside this interpreter (the venv), else on PATH."""
    beside = Path(sys.executable).parent / BINARY_NAME
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which(BINARY_NAME)


def node_ip() -> str | None:
    """The namespace's non-loopback address, when running inside infra/netns-run."""
    if os.environ.get("AVATARQ_IN_NETNS") != "1":
        return None
    addr = os.environ.get(NETNS_ADDR_ENV, "")
    return addr.split("/", 1)[0] or None


def choice() -> str:
    """`official` or `embedded`: which LiveKit server the local stack starts."""
    wanted = os.environ.get(CHOICE_ENV, "auto").strip().lower() or "auto"
    if wanted not in ("auto", "official", "embedded"):
        raise ServiceError(f"{CHOICE_ENV} must be auto, official or embedded, not {wanted!r}")
    if wanted == "embedded":
        return "embedded"
    missing = why_unavailable()
    if missing is None:
        return "official"
    if wanted == "official":
        raise ServiceError(f"{CHOICE_ENV}=official but {missing}")
    return "embedded"


def why_unavailable() -> str | None:
    if binary() is None:
        return f"{BINARY_NAME} is not installed (infra/bootstrap builds it when Go is present)"
    if node_ip() is None:
        return "not inside infra/netns-run (the server needs the namespace's veth address)"
    return None


def config_yaml(
    *,
    port: int,
    tcp_port: int,
    udp_port: int,
    keys: dict[str, str],
    node_ip: str,
    empty_timeout_s: int | None = None,
    departure_timeout_s: int | None = None,
    redis_address: str | None = None,
) -> str:
    """The server's YAML config (JSON is YAML): ports, keys, addresses and room timeouts;
    with `redis_address` (host:port) it keeps its state in Redis, as LiveKit Egress needs."""
    room: dict[str, int] = {}
    if empty_timeout_s is not None:
        room["empty_timeout"] = empty_timeout_s
    if departure_timeout_s is not None:
        room["departure_timeout"] = departure_timeout_s
    config = {
        "port": port,
        "bind_addresses": [HOST, node_ip],
        "rtc": {
            "tcp_port": tcp_port,
            "udp_port": udp_port,
            "node_ip": node_ip,
            "use_external_ip": False,
        },
        "keys": keys,
        "logging": {"level": "info"},
        **({"room": room} if room else {}),
        **({"redis": {"address": redis_address}} if redis_address else {}),
    }
    return json.dumps(config, indent=2)


def official_server(
    *,
    keys: dict[str, str],
    log_dir: Path,
    empty_timeout_s: int | None = None,
    departure_timeout_s: int | None = None,
    redis: RedisServer | None = None,
) -> ManagedProcess:
    """A `livekit-server --dev` process, not started yet; its ports (signalling, ICE/TCP and
    the ICE/UDP mux) are picked when it starts, `port` is the signalling one. With `redis`
    (started before it) it keeps its state there (what LiveKit Egress needs)."""
    path, ip = binary(), node_ip()
    if path is None or ip is None:
        raise ServiceError(f"cannot run the official LiveKit server: {why_unavailable()}")
    log_dir.mkdir(parents=True, exist_ok=True)

    def argv(ports: Ports) -> list[str]:
        port, tcp_port, udp_port = ports
        config = log_dir / f"livekit-{port}.yaml"
        config.write_text(
            config_yaml(
                port=port,
                tcp_port=tcp_port,
                udp_port=udp_port,
                keys=keys,
                node_ip=ip,
                empty_timeout_s=empty_timeout_s,
                departure_timeout_s=departure_timeout_s,
                redis_address=f"{HOST}:{redis.port}" if redis else None,
            )
        )
        return [path, "--dev", "--config", str(config)]

    return ManagedProcess("livekit", argv, ports=["tcp", "tcp", "udp"], log_dir=log_dir)
