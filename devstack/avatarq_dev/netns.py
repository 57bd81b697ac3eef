"""A private network namespace for the local stack (the `netns-run` script shipped in this
package; `infra/netns-run` is its entry from a checkout). libwebrtc ignores loopback, so a
participant needs the namespace's veth address."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib import resources

#: Set inside the namespace (by netns-run).
IN_NETNS_ENV = "AVATARQ_IN_NETNS"


def inside() -> bool:
    return os.environ.get(IN_NETNS_ENV) == "1"


def run(cmd: list[str]) -> int:
    """Run `cmd` inside a namespace of its own; its exit code. Run through bash: an installed
    package's data file may have lost its executable bit."""
    with resources.as_file(resources.files("avatarq_dev") / "netns-run") as script:
        return subprocess.call(["bash", str(script), *cmd])


def rerun_avatarq(argv: list[str]) -> int:
    """Re-run this `avatarq` command (its arguments `argv`) inside a namespace."""
    return run([sys.executable, "-m", "avatarq_cli", *argv])
