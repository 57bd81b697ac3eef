"""`avatarq schedule validate|list FILE`: check a schedule file and show its next fire times."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from avatarq_cli.commands.common import EXIT_INVALID, err

if TYPE_CHECKING:
    from producers.schedules import Announcement

schedule = typer.Typer(no_args_is_help=True, help="Scheduled announcements (celery beat).")

FileArg = Annotated[Path, typer.Argument(help="Schedule file (YAML)", exists=True, dir_okay=False)]


def _load(path: Path) -> list[Announcement]:
    from producers.schedules import ScheduleError, load_schedule

    try:
        return load_schedule(path)
    except ScheduleError as e:
        for problem in e.problems:
            err.print(
                f"[red]{path}:{problem.line}[/] {problem.field}: {problem.message}", soft_wrap=True
            )
        raise typer.Exit(EXIT_INVALID) from None


@schedule.command()
def validate(path: FileArg) -> None:
    """Check every announcement (cron, timezone, job template); exit 2 naming line and field.

    Example: avatarq schedule validate schedules.yaml
    """
    announcements = _load(path)
    err.print(f"[green]ok[/] {path}: {len(announcements)} announcement(s)")


@schedule.command(name="list")
def list_(
    path: FileArg,
    count: Annotated[int, typer.Option(help="Fire times per announcement", min=1)] = 5,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON")] = False,
) -> None:
    """Show each announcement's next fire times, in its own timezone.

    Example: avatarq schedule list schedules.yaml --count 3
    """
    rows = [
        {
            "name": a.name,
            "when": f"cron {a.cron}" if a.cron else f"every {a.every:g}s",
            "timezone": a.zone.key,
            "next": [t.isoformat() for t in a.next_fires(count)],
        }
        for a in _load(path)
    ]
    if as_json:
        print(json.dumps(rows))
        return
    for row in rows:
        print(f"{row['name']}  ({row['when']}, {row['timezone']})")
        for t in row["next"]:
            print(f"  {t}")


def register(app: typer.Typer) -> None:
    app.add_typer(schedule, name="schedule")
