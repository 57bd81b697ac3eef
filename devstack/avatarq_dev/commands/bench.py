"""`avatarq bench`: measure overhead, pacing, concurrency, decode, queue, sender cost, the
fleet under a burst and what a recording costs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from avatarq_dev.bench import FULL, QUICK, SECTIONS, emit


def bench(
    quick: Annotated[
        bool, typer.Option("--quick", help="Small counts, about 6 minutes on 2 cores")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object")] = False,
    sections: Annotated[
        str, typer.Option(help=f"Comma-separated: {', '.join(SECTIONS)}")
    ] = ",".join(SECTIONS),
    docs: Annotated[
        Path | None, typer.Option(help="Write performance.md and the PNG plots here")
    ] = None,
) -> None:
    """Benchmark the worker on the local stack, every figure against a baseline.

    Example: infra/netns-run avatarq bench --quick --json
    """
    code = emit(QUICK if quick else FULL, tuple(sections.split(",")), as_json, docs)
    if code:
        raise typer.Exit(code)


app = typer.Typer(add_completion=False)
app.command()(bench)
