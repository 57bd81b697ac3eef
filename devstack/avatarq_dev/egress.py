"""LiveKit Egress (Go and GStreamer, built by infra/build-egress) as a managed local process.

It records from the stack's official livekit-server, which must keep its state in the stack's
Redis (`local_stack(livekit_redis=True)`): the server hands egress requests to it over Redis.
It stores files with its own storage settings (`s3_storage`, or a local directory)."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from avatarq_dev import livekit_official
from avatarq_dev.processes import ManagedProcess, Ports, ServiceError
from avatarq_dev.stack import DEV_API_KEY, LocalStack

#: The release infra/build-egress builds: the one whose protocol and psrpc match the
#: official server's (docs/recordings-egress.md).
VERSION = "v1.14.1"
BINARY_NAME = "livekit-egress"
#: Where Egress writes a file before it uploads it: fixed in its code, not configurable.
EGRESS_TMP_DIR = Path("/home/egress/tmp")


def binary() -> str | None:
    """The egress binary beside this interpreter (where infra/build-egress puts it), else on
    PATH."""
    beside = Path(sys.executable).parent / BINARY_NAME
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which(BINARY_NAME)


def why_unavailable() -> str | None:
    if binary() is None:
        return f"{BINARY_NAME} is not built (infra/build-egress, docs/recordings-egress.md)"
    return livekit_official.why_unavailable()


def s3_storage(*, endpoint: str, bucket: str, region: str, key: str, secret: str) -> dict[str, Any]:
    """Egress's `storage` setting for an S3-compatible store addressed by path (moto, MinIO)."""
    return {
        "s3": {
            "endpoint": endpoint,
            "bucket": bucket,
            "region": region,
            "access_key": key,
            "secret": secret,
            "force_path_style": True,
        }
    }


def config_yaml(
    stack: LocalStack, *, health_port: int, template_port: int, storage: dict[str, Any]
) -> str:
    """Egress's YAML config (JSON is YAML). Its CPU costs are lowered from the defaults (2
    cores for a participant egress, sized for 1080p composites) so that a 2-core machine
    takes one: the avatar's video is small."""
    config = {
        "api_key": DEV_API_KEY,
        "api_secret": stack.api_secret,
        "ws_url": stack.livekit_url,
        "redis": {"address": f"{livekit_official.HOST}:{stack.redis.port}"},
        "health_port": health_port,
        "template_port": template_port,
        "storage": storage,
        "logging": {"level": "info"},
        "cpu_cost": {"max_cpu_utilization": 0.95, "participant_cpu_cost": 0.5},
    }
    return json.dumps(config, indent=2)


def egress_service(stack: LocalStack, *, storage: dict[str, Any]) -> ManagedProcess:
    """An egress server for `stack` (its LiveKit server keeping state in its Redis), not
    started yet; it is ready once it has registered for requests."""
    path = binary()
    if path is None or stack.server != "official":
        raise ServiceError(
            f"cannot run LiveKit Egress: {why_unavailable() or 'no official server'}"
        )
    log_dir = stack.workdir / "logs"
    # The server runs each recording as `egress run-handler`, found on PATH by that name.
    handler_dir = stack.workdir / "egress-bin"
    handler_dir.mkdir(exist_ok=True)
    (handler_dir / "egress").unlink(missing_ok=True)
    (handler_dir / "egress").symlink_to(path)

    def argv(ports: Ports) -> list[str]:
        health, template = ports
        config = log_dir / f"egress-{health}.yaml"
        config.write_text(
            config_yaml(stack, health_port=health, template_port=template, storage=storage)
        )
        return [path, "--config", str(config)]

    proc = ManagedProcess(
        "egress",
        argv,
        ports=["tcp", "tcp"],
        ready=lambda: "service ready" in proc.tail(200),
        env={"PATH": f"{handler_dir}{os.pathsep}{os.environ.get('PATH', '')}"},
        log_dir=log_dir,
        start_timeout=60,
    )
    return proc
