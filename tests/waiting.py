"""Waiting for jobs in the tests: until each has a terminal record, bounded in time."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

POLL_S = 0.1


def wait_terminal(
    *job_ids: str, timeout: float, context: Callable[[], str] = str
) -> dict[str, dict[str, Any]]:
    """The terminal records of `job_ids` (`producers.get_status`), polled every 0.1 s for at
    most `timeout` seconds; fails the test naming the jobs that did not end, and `context()`
    (e.g. the workers' log tails)."""
    from producers import get_status
    from producers.client import is_terminal

    ended: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / POLL_S) + 1):
        for job_id in job_ids:
            if job_id not in ended and is_terminal(status := get_status(job_id)):
                ended[job_id] = status
        if len(ended) == len(job_ids) or time.monotonic() >= deadline:
            break
        time.sleep(POLL_S)
    missing = [j for j in job_ids if j not in ended]
    assert not missing, f"{len(missing)} job(s) did not end in {timeout:g}s: {missing}\n{context()}"
    return ended
