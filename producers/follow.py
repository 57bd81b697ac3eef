"""Waiting for a job to end, with a progress bar of seconds played: the `avatarq` commands
and the dev stack's demo both follow jobs, and both sit above the producers."""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from producers.client import get_status, is_terminal

POLL_INTERVAL_S = 0.25


class JobTimeout(TimeoutError):
    """The job did not end within the time given to wait for it (`avatarq` exits 3)."""


def follow(job_id: str, *, timeout: float, show_progress: bool) -> dict[str, Any]:
    """Poll the job until it ends (else `JobTimeout`), drawing a bar of seconds played on
    stderr (stdout is left to the command's output)."""
    deadline = time.monotonic() + timeout
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[played]}"))
    console = Console(stderr=True)
    with Progress(*columns, TimeElapsedColumn(), console=console, disable=not show_progress) as bar:
        task = bar.add_task(f"job {job_id}", total=None, played="queued")
        while time.monotonic() < deadline:
            status = get_status(job_id)
            if is_terminal(status):
                return status
            streamed, total = status.get("seconds_streamed"), status.get("total_seconds")
            if streamed is not None:
                bar.update(task, completed=streamed, total=total, played=f"{streamed:.1f}s played")
            else:
                bar.update(task, played=status.get("status", "queued"))
            time.sleep(POLL_INTERVAL_S)
    raise JobTimeout(f"job {job_id} did not finish within {timeout:g}s")
