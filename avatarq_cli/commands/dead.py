"""`avatarq dead list|retry|purge`: the dead-letter list of jobs that exhausted their retries."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Annotated

import typer
from rich.table import Table

from avatarq_cli.commands.common import EXIT_FAILED, err

dead = typer.Typer(no_args_is_help=True, help="Jobs that exhausted their retries.")


@dead.command(name="list")
def list_(as_json: Annotated[bool, typer.Option("--json", help="Print JSON")] = False) -> None:
    """Show dead-lettered jobs, newest first.

    Example: avatarq dead list
    """
    from producers.deadletter import list_dead

    entries = list_dead()
    if as_json:
        print(json.dumps(entries, default=str))
        return
    table = Table("job", "room", "reason", "attempts", "when", "error")
    for e in entries:
        when = datetime.fromtimestamp(e["ts"], UTC).strftime("%Y-%m-%d %H:%M:%S")
        table.add_row(e["job_id"], e.get("room"), e["reason"], str(e["attempt"]), when, e["error"])
    err.print(table)


@dead.command()
def retry(
    job_id: Annotated[str | None, typer.Argument(help="Job to replay")] = None,
    all_: Annotated[bool, typer.Option("--all", help="Replay every dead-lettered job")] = False,
) -> None:
    """Enqueue dead-lettered jobs again (same job id, attempts counted from 1).

    Example: avatarq dead retry 4f2a9c
    """
    from producers.deadletter import list_dead, retry_dead

    ids = [e["job_id"] for e in list_dead()] if all_ else [job_id] if job_id else []
    if not ids:
        raise typer.BadParameter("give a JOB_ID or --all")
    for one in ids:
        try:
            retry_dead(one)
        except KeyError as e:
            err.print(f"[red]error:[/] {e.args[0]}")
            raise typer.Exit(EXIT_FAILED) from None
        err.print(f"re-enqueued job {one}")


@dead.command()
def purge(
    job_id: Annotated[str | None, typer.Argument(help="Job to drop (default: all)")] = None,
) -> None:
    """Drop dead-lettered jobs for good.

    Example: avatarq dead purge
    """
    from producers.deadletter import purge_dead

    err.print(f"dropped {purge_dead(job_id)} job(s)")


def register(app: typer.Typer) -> None:
    app.add_typer(dead, name="dead")
