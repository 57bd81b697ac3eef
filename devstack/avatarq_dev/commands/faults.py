"""`avatarq faults`: run the fault suite on the local stack and print its table."""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from avatarq_dev import netns as namespace
from avatarq_dev.faults import SCENARIOS, fault_lab, judge, leaked_secrets

BROKERS = ("redis", "rabbitmq")
COLUMNS = (
    "broker",
    "enqueued",
    "completed",
    "failed",
    "cancelled",
    "lost",
    "played_twice",
    "never_heard_s",
    "heard_twice_s",
    "overlaps",
)
err = Console(stderr=True)


def faults(
    only: Annotated[list[str] | None, typer.Option(help="Run only these scenarios")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON")] = False,
    markdown: Annotated[Path | None, typer.Option(help="Also write the table here")] = None,
    netns: Annotated[bool, typer.Option(help="Run inside a private network namespace")] = False,
    broker: Annotated[
        list[str] | None, typer.Option(help="Broker(s) to run on: redis, rabbitmq (default both)")
    ] = None,
) -> None:
    """Inject each fault into the real local stack; report lost / twice-played jobs (both
    must be 0), overlaps and recovery time. Exit 1 if any scenario misses an expectation.

    Example: avatarq faults --netns --markdown docs/faults.md
    """
    if netns and not namespace.inside():
        raise typer.Exit(namespace.rerun_avatarq(sys.argv[1:]))

    names = only or list(SCENARIOS)
    unknown = sorted(set(names) - set(SCENARIOS))
    if unknown:
        raise typer.BadParameter(f"unknown scenario(s): {', '.join(unknown)}")
    brokers = broker or list(BROKERS)
    if bad := sorted(set(brokers) - set(BROKERS)):
        raise typer.BadParameter(f"unknown broker(s): {', '.join(bad)}")
    reports = []
    leaks: list[str] = []
    for name_of_broker in brokers:
        workdir = Path(tempfile.mkdtemp(prefix=f"avatarq-faults-{name_of_broker}-"))
        with fault_lab(workdir, broker=name_of_broker) as lab:  # type: ignore[arg-type]
            for name in names:
                err.print(f"fault ({name_of_broker}): {name} …")
                report = judge(name, SCENARIOS[name](lab))
                reports.append({"broker": name_of_broker, **report.as_dict()})
            secrets = [lab.stack.api_secret, lab.stack.license_key]
            leaks += leaked_secrets(lab.exposed(), secrets)
    if as_json:
        print(json.dumps({"scenarios": reports, "leaked_secrets": leaks}, default=str))
    else:
        table = Table("fault", *COLUMNS, "recover s", "ok")
        for r in reports:
            recover = "" if r["recover_s"] is None else f"{r['recover_s']:.1f}"
            table.add_row(r["fault"], *(str(r[c]) for c in COLUMNS), recover, str(r["ok"]))
        err.print(table)
        err.print(f"secrets found in logs, records or events: {len(leaks)}")
    if markdown:
        markdown.write_text(to_markdown(reports, leaks))
    if leaks or not all(r["ok"] for r in reports):
        raise typer.Exit(1)


def to_markdown(reports: list[dict], leaks: list[str]) -> str:  # type: ignore[type-arg]
    head = "| fault | " + " | ".join(COLUMNS) + " | recover s | ok |"
    rows = [head, "|" + "---|" * (len(COLUMNS) + 3)]
    for r in reports:
        recover = "" if r["recover_s"] is None else f"{r['recover_s']:.1f}"
        cells = [r["fault"], *(str(r[c]) for c in COLUMNS), recover, "yes" if r["ok"] else "NO"]
        rows.append("| " + " | ".join(cells) + " |")
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    cores = os.cpu_count()
    return (
        f"Produced {when} by `avatarq faults --netns` on a {cores}-core machine (local stack: "
        "LiveKit server (the official one where it runs), avatar emulator, moto S3; Redis with "
        "redis-server's default "
        "persistence, RDB only; the broker Redis or RabbitMQ, its quorum queue). Default settings "
        "throughout "
        "(visibility timeout 4200 s, 15 s leases, default retries and timeouts), except: "
        "the SIGTERM hand-back uses a 1 s shutdown grace (a hand-back needs a job longer than "
        "the grace) and the two avatar-failure scenarios shorten retries and the join timeout "
        "(retried to exhaustion, they would take minutes).\n\n"
        + "\n".join(rows)
        + f"\n\nSecrets found in worker logs, job records, results and events: {len(leaks)}.\n"
    )


app = typer.Typer(add_completion=False)
app.command()(faults)
