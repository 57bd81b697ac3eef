"""`avatarq demo`: bring up the local stack, play one job end to end, print a summary."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from avatarq_dev import netns as namespace
from avatarq_dev.demo import run_demo
from producers.follow import follow

app = typer.Typer(add_completion=False)


@app.command()
def demo(
    source: Annotated[
        str | None, typer.Option(help="Audio to play (default: bundled sample)")
    ] = None,
    say: Annotated[
        str | None, typer.Option(help="Speak this text instead (rendered with espeak-ng)")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON")] = False,
    workdir: Annotated[Path | None, typer.Option(help="Keep logs and recordings here")] = None,
    netns: Annotated[bool, typer.Option(help="Run inside a private network namespace")] = False,
    keep: Annotated[
        bool, typer.Option(help="Then keep the stack up and serve the console until Ctrl-C")
    ] = False,
) -> None:
    """Bring up the local stack, play one job end to end, print a summary, shut down.

    Example: avatarq demo --netns --say "Hello from the avatar queue"
    """
    if netns and not namespace.inside():
        raise typer.Exit(namespace.rerun_avatarq(sys.argv[1:]))
    speech = {"type": "tts", "engine": "espeak", "text": say} if say else None
    summary = run_demo(
        follow, source=speech or source, workdir=workdir, show_progress=not as_json, keep=keep
    )
    if as_json:
        print(json.dumps(summary, default=str))
    if summary.get("status") != "completed":
        raise typer.Exit(1)  # the job failed or was cancelled
