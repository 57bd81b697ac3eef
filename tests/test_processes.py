"""The dev stack's ManagedProcess, which every test service runs under."""

from __future__ import annotations

import sys
from pathlib import Path

from avatarq_dev.processes import ManagedProcess


def test_entering_a_started_process_neither_starts_nor_orphans_a_second(tmp_path: Path) -> None:
    # `with proc.start():` is how fixtures use it: the first process must be the one stopped.
    proc = ManagedProcess(
        "sleeper",
        [sys.executable, "-c", "import time; time.sleep(60)"],
        ready=lambda: True,
        log_dir=tmp_path,
    )
    started = proc.start()
    first = proc.proc
    assert first is not None and first.poll() is None
    with started:
        assert proc.proc is first
    assert first.poll() is not None  # the one process, stopped on leaving the block
