"""What the `avatarq` commands share: exit codes, the error console, the dev stack's absence,
the outcome of a job.

Exit codes: 0 done, 1 the job failed, was cancelled or is unconfirmed, 2 bad input, 3 timed
out waiting, 4 Redis or the broker is unreachable.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from typing import Any

import typer
from rich.console import Console

EXIT_FAILED, EXIT_INVALID, EXIT_TIMEOUT, EXIT_UNAVAILABLE = 1, 2, 3, 4


err = Console(stderr=True)


def fail(message: str, code: int) -> typer.Exit:
    err.print(f"[red]error:[/] {message}")
    return typer.Exit(code)


#: The distribution of `avatarq_dev` (devstack/ in the repository), and how to get it.
DEV_STACK = "avatarq-dev"
DEV_STACK_INSTALL = (
    "pip install ./devstack with its emulator extra (from a checkout), or make bootstrap"
)


@contextlib.contextmanager
def dev_stack(command: str) -> Iterator[None]:
    """Around a run of the dev stack's `command`: when the dev stack, or one of
    its own dependencies, is not installed, one line saying what is missing and how to install
    it, and exit 1 (a lean worker/producer install has neither)."""
    try:
        yield
    except ModuleNotFoundError as e:
        name = (e.name or "").partition(".")[0]
        if name in ("avatarq", "avatarq_cli", "producers", "tasks"):
            raise  # ours: a bug, not a missing install
        what = (
            f"the dev stack ({DEV_STACK}), which is not installed"
            if name == "avatarq_dev"
            else f"{e.name}, a dependency of the dev stack ({DEV_STACK}), which is not installed"
        )
        err.print(f"[red]error:[/] {command} needs {what}: {DEV_STACK_INSTALL}", soft_wrap=True)
        raise typer.Exit(EXIT_FAILED) from None


def report(result: dict[str, Any], *, as_json: bool) -> None:
    if as_json:
        print(json.dumps(result, default=str))
    elif result.get("status") == "completed":
        pos = result.get("playback_position")
        where = f"{pos:.2f}s" if isinstance(pos, (int, float)) else "unconfirmed"
        err.print(
            f"[green]completed[/] job {result['job_id']}: "
            f"{result.get('seconds_streamed', 0):.2f}s streamed, played to {where}"
        )
    else:
        err.print(f"[red]{result.get('status')}[/] job {result['job_id']}: {result.get('error')}")


def conclude(job_id: str, *, wait: bool, timeout: float, as_json: bool) -> None:
    """After enqueueing: say it is queued, or with `wait` follow it and exit with its outcome."""
    if not wait:
        if as_json:
            print(json.dumps({"job_id": job_id, "status": "queued"}))
        else:
            err.print(f"queued job {job_id}")
        return
    from producers.follow import follow

    result = follow(job_id, timeout=timeout, show_progress=not as_json)
    report(result, as_json=as_json)
    if result.get("status") != "completed":
        raise typer.Exit(EXIT_FAILED)
