"""`avatarq enqueue-many MANIFEST`: enqueue a JSONL or CSV manifest of jobs, optionally wait."""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from avatarq.errors import JobError
from avatarq_cli.commands.common import EXIT_FAILED, EXIT_INVALID, EXIT_TIMEOUT, err
from producers.follow import POLL_INTERVAL_S

#: Polling a whole batch costs one status read per pending job: poll it less often than one.
BATCH_POLL_INTERVAL_S = 4 * POLL_INTERVAL_S


def _bar(disable: bool) -> Progress:
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
    return Progress(
        *columns,
        TextColumn("{task.fields[counts]}"),
        TimeElapsedColumn(),
        console=err,
        disable=disable,
    )


def _wait_all(job_ids: list[str], timeout: float, show_progress: bool) -> dict[str, dict[str, Any]]:
    """Poll until every job ended or `timeout`; returns the final status of those that ended."""
    from producers import get_status
    from producers.client import is_terminal

    ended: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + timeout
    with _bar(disable=not show_progress) as bar:
        task = bar.add_task("playing", total=len(job_ids), counts="")
        while len(ended) < len(job_ids) and time.monotonic() < deadline:
            for job_id in job_ids:
                if job_id not in ended and is_terminal(status := get_status(job_id)):
                    ended[job_id] = status
            counts = Counter(s["status"] for s in ended.values())
            bar.update(
                task,
                completed=len(ended),
                counts=" ".join(f"{k} {v}" for k, v in sorted(counts.items())),
            )
            if len(ended) < len(job_ids):
                time.sleep(BATCH_POLL_INTERVAL_S)
    return ended


def enqueue_many(
    manifest: Annotated[
        Path, typer.Argument(help="JSONL or CSV manifest of jobs", exists=True, dir_okay=False)
    ],
    skip_invalid: Annotated[
        bool, typer.Option(help="Enqueue the valid rows even if some are invalid")
    ] = False,
    wait: Annotated[bool, typer.Option(help="Wait until every job of the batch ended")] = False,
    timeout: Annotated[float, typer.Option(help="Seconds to wait with --wait")] = 3600.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON summary, no bars")] = False,
) -> None:
    """Validate every row of a manifest, then enqueue them all (none if any row is invalid).

    Example: avatarq enqueue-many jobs.csv --wait
    """
    from producers import enqueue
    from producers.manifest import ManifestError, load_manifest, prepare_rows

    try:
        loaded = load_manifest(manifest)
    except ManifestError as e:
        err.print(f"[red]error:[/] {manifest}: {e}", soft_wrap=True)
        raise typer.Exit(EXIT_INVALID) from None
    try:
        # Rendered and checked before the first row is sent: all rows, or none.
        prepare_rows(loaded)
    except JobError as e:
        err.print(f"[red]error:[/] {manifest}: nothing enqueued: {e} (try again)", soft_wrap=True)
        raise typer.Exit(EXIT_FAILED) from None
    for bad in loaded.invalid:
        err.print(f"[red]{manifest}[/] {bad}", soft_wrap=True)
    if loaded.invalid and not skip_invalid:
        err.print(
            f"nothing enqueued: {len(loaded.invalid)} invalid row(s) (or pass --skip-invalid)"
        )
        raise typer.Exit(EXIT_INVALID)

    job_ids: list[str] = []
    with _bar(disable=as_json) as bar:
        task = bar.add_task("enqueuing", total=len(loaded.jobs), counts="")
        for _line, job in loaded.jobs:
            job_ids.append(enqueue(job).job_id)
            bar.advance(task)
    summary: dict[str, Any] = {
        "enqueued": len(job_ids),
        "invalid": [{"line": b.line, "errors": dict(b.errors)} for b in loaded.invalid],
        "job_ids": job_ids,
    }
    if not wait:
        _print_summary(summary, as_json)
        return

    ended = _wait_all(job_ids, timeout, show_progress=not as_json)
    counts = Counter(s["status"] for s in ended.values())
    summary.update(
        completed=counts["completed"],
        failed=counts["failed"],
        cancelled=counts["cancelled"],
        pending=len(job_ids) - len(ended),
        problems=[
            {"job_id": i, **{k: s.get(k) for k in ("status", "reason", "error")}}
            for i, s in ended.items()
            if s["status"] != "completed"
        ],
    )
    _print_summary(summary, as_json)
    if summary["pending"]:
        raise typer.Exit(EXIT_TIMEOUT)
    if summary["completed"] != len(job_ids):
        raise typer.Exit(EXIT_FAILED)


def _print_summary(summary: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(summary))
        return
    line = f"enqueued {summary['enqueued']} job(s)"
    if summary["invalid"]:
        line += f", skipped {len(summary['invalid'])} invalid row(s)"
    if "completed" in summary:
        line += f": {summary['completed']} completed, {summary['failed']} failed"
        line += f", {summary['cancelled']} cancelled, {summary['pending']} still pending"
    err.print(line)
    for p in summary.get("problems", []):
        err.print(f"[red]{p['status']}[/] job {p['job_id']}: {p['error']}", soft_wrap=True)


def register(app: typer.Typer) -> None:
    app.command(name="enqueue-many")(enqueue_many)
