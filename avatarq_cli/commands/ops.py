"""`avatarq config` and the fleet overview of `avatarq status` (no JOB_ID): what an operator
checks first. Reads Redis and asks workers over Celery's broadcast; never prints a secret."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, Any
from urllib.parse import urlsplit, urlunsplit

import typer
from pydantic import SecretStr
from rich.console import Console
from rich.table import Table

from avatarq.celeryconfig import RENDER_QUEUE
from avatarq.events import Event
from avatarq.settings import Settings, get_settings

MASK = "********"
#: Celery's Redis transport keeps priority levels 3, 6, 9 in lists beside the queue's own.
PRIORITY_SUFFIXES = ("", "\x06\x163", "\x06\x166", "\x06\x169")
#: Seconds to wait for workers to answer `inspect` (they answer in milliseconds when alive).
INSPECT_TIMEOUT_S = 1.0
#: How far back in the events stream to look for failures.
EVENTS_SCANNED = 2000
RECENT_FAILURES = 10

out = Console()


def mask_url(url: str) -> str:
    """Hide the password of `scheme://user:password@host/...` (Redis URLs carry one)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username or ''}:{MASK}@{parts.hostname}"
    netloc += f":{parts.port}" if parts.port else ""
    return urlunsplit(parts._replace(netloc=netloc))


def effective_config(settings: Settings) -> dict[str, Any]:
    """Each setting under its environment name, secrets and URL passwords masked."""
    config: dict[str, Any] = {}
    for name, field in Settings.model_fields.items():
        env_name = str(field.validation_alias.choices[0])  # type: ignore[union-attr]
        value = getattr(settings, name)
        if isinstance(value, SecretStr):
            value = MASK if value.get_secret_value() else ""
        elif isinstance(value, str) and "://" in value:
            value = mask_url(value)
        config[env_name] = value if value is None or isinstance(value, (int, float)) else str(value)
    return config


def config(as_json: Annotated[bool, typer.Option("--json", help="Print JSON")] = False) -> None:
    """Print the effective configuration (environment and .env.local), secrets masked.

    Example: avatarq config --json
    """
    values = effective_config(get_settings())
    if as_json:
        print(json.dumps(values))
        return
    table = Table("setting", "value", title="avatarq configuration")
    for key, value in values.items():
        table.add_row(key, "" if value is None else str(value))
    out.print(table)


def queue_depth(redis: Any) -> int:
    return sum(int(redis.llen(RENDER_QUEUE + suffix)) for suffix in PRIORITY_SUFFIXES)


def workers_and_jobs(app: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The workers answering `inspect` (name, concurrency, active jobs) and their jobs."""
    inspect = app.control.inspect(timeout=INSPECT_TIMEOUT_S)
    # Each broadcast waits out its whole timeout for replies: ask both at once.
    with ThreadPoolExecutor(2) as asking:
        asked_active, asked_stats = asking.submit(inspect.active), asking.submit(inspect.stats)
        active, stats = asked_active.result() or {}, asked_stats.result() or {}
    workers, jobs = [], []
    for name in sorted(set(active) | set(stats)):
        running = active.get(name) or []
        pool = (stats.get(name) or {}).get("pool") or {}
        workers.append(
            {"worker": name, "concurrency": pool.get("max-concurrency"), "active": len(running)}
        )
        for task in running:
            payload = (task.get("args") or [{}])[0]
            payload = payload if isinstance(payload, dict) else {}
            jobs.append(
                {
                    "job_id": task.get("id"),
                    "room": payload.get("room"),
                    "avatar_id": payload.get("avatar_id"),
                    "worker": name,
                    "started": task.get("time_start"),
                }
            )
    return workers, jobs


def recent_failures(redis: Any, stream: str) -> list[dict[str, Any]]:
    failures = []
    for _id, fields in redis.xrevrange(stream, count=EVENTS_SCANNED):
        if fields.get(b"event", b"").decode() != Event.FAILED.value:
            continue
        data = json.loads(fields.get(b"data") or b"{}")
        failures.append(
            {
                "job_id": fields.get(b"job_id", b"").decode(),
                "ts": float(fields.get(b"ts") or 0),
                "reason": data.get("reason"),
                "error": data.get("error"),
            }
        )
        if len(failures) == RECENT_FAILURES:
            break
    return failures


def overview(settings: Settings) -> dict[str, Any]:
    from avatarq import redisclient
    from producers.client import avatar_capacity, celery_app

    client = redisclient.client(settings.redis_url)
    try:
        workers, jobs = workers_and_jobs(celery_app(settings))
        return {
            "queue": RENDER_QUEUE,
            "queue_depth": queue_depth(client),
            "workers": workers,
            "jobs_in_flight": jobs,
            "avatar_servers": avatar_capacity(settings),
            "recent_failures": recent_failures(client, settings.events_stream),
        }
    finally:
        client.close()


def show_overview(*, as_json: bool) -> None:
    """`avatarq status` without a job id: queue, workers, jobs in flight, recent failures."""
    data = overview(get_settings())
    if as_json:
        print(json.dumps(data, default=str))
        return
    out.print(f"queue [bold]{data['queue']}[/]: {data['queue_depth']} job(s) waiting")
    sections = (
        ("workers", ("worker", "concurrency", "active")),
        ("jobs_in_flight", ("job_id", "room", "avatar_id", "worker")),
        ("avatar_servers", ("server", "sessions", "quota", "waiting")),
        ("recent_failures", ("job_id", "reason", "error")),
    )
    for key, columns in sections:
        table = Table(*columns, title=key.replace("_", " "))
        for row in data[key]:
            table.add_row(*("" if row[c] is None else str(row[c]) for c in columns))
        out.print(table)


def register(app: typer.Typer) -> None:
    app.command()(config)
