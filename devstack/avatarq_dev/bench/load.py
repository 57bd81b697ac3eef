"""The benchmark's load receiver on a local stack: the light avatar server
(devstack/avatarq_dev/bench/light_avatar.py) over several processes, and the processes to sample."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import psutil

from avatarq_dev.processes import ManagedProcess, python_module
from avatarq_dev.stack import HOST, LocalStack

#: Receiver processes: on this 2-core machine, enough that no single one saturates first.
RECEIVER_PROCESSES = 4


@dataclass
class LightAvatars:
    proc: ManagedProcess
    url: str

    def env(self) -> dict[str, str]:
        """Worker settings that send its jobs' avatars here instead of to the emulator."""
        return {"AVALUMA_API_URL": self.url}

    def processes(self) -> dict[str, psutil.Process]:
        """The front (forwarding starts) and each receiver child, by name."""
        assert self.proc.proc is not None
        front = psutil.Process(self.proc.proc.pid)
        children = sorted(front.children(), key=lambda p: p.pid)
        return {"receiver_front": front} | {f"receiver_{i}": c for i, c in enumerate(children)}


@contextlib.contextmanager
def light_avatars(stack: LocalStack, processes: int = RECEIVER_PROCESSES) -> Iterator[LightAvatars]:
    proc = python_module(
        "light-avatar",
        "avatarq_dev.bench.light_avatar",
        lambda ports: [
            "--host",
            HOST,
            "--port",
            str(ports[0]),
            "--license-key",
            stack.license_key,
            "--record-dir",
            str(stack.recordings),
            "--processes",
            str(processes),
        ],
        ports=["tcp"],
        log_dir=stack.workdir / "logs",
        start_timeout=60,
    )
    proc.start()
    try:
        yield LightAvatars(proc, f"http://{HOST}:{proc.port}")
    finally:
        proc.stop()
