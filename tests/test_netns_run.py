"""infra/netns-run: the command it runs is the process a caller signals."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

NETNS_RUN = Path(__file__).parents[1] / "infra" / "netns-run"

WAITS_FOR_TERM = """
import signal, sys, time
signal.signal(signal.SIGTERM, lambda *_: sys.exit(7))
print("ready", flush=True)
time.sleep(30)
"""


def test_a_signal_sent_to_netns_run_reaches_its_command() -> None:
    # `timeout` and `kill` signal the pid they started: the command must hear it, not wait
    # out its run. A fresh namespace even when the suite itself runs in one.
    env = {k: v for k, v in os.environ.items() if k != "AVATARQ_IN_NETNS"}
    run = subprocess.Popen(
        ["bash", str(NETNS_RUN), sys.executable, "-c", WAITS_FOR_TERM],
        stdout=subprocess.PIPE,
        env=env,
    )
    try:
        assert run.stdout is not None and run.stdout.readline() == b"ready\n"
        run.send_signal(signal.SIGTERM)
        assert run.wait(timeout=10) == 7
    finally:
        run.kill()
        run.wait()
