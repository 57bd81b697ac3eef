"""`avatarq`: enqueue and follow jobs, run workers, run the local stack.

Exit codes: 0 done, 1 the job failed or was cancelled, 2 bad input, 3 timed out waiting,
4 Redis or the broker is unreachable.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from avatarq.errors import InvalidJob
from avatarq.settings import get_settings
from avatarq_cli import plugins
from avatarq_cli.commands.common import (
    EXIT_FAILED,
    EXIT_INVALID,
    EXIT_TIMEOUT,
    EXIT_UNAVAILABLE,
    conclude,
    err,
    fail,
)

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)


@app.command()
def enqueue(
    source: Annotated[
        str, typer.Argument(help="Audio: path, file://, http(s):// or s3://bucket/key")
    ],
    room: Annotated[str, typer.Option(help="LiveKit room name")],
    avatar: Annotated[str, typer.Option(help="Avatar id (participant avatar-<id>)")],
    job_id: Annotated[str | None, typer.Option(help="Idempotency key (default: random)")] = None,
    avatar_server: Annotated[
        str | None, typer.Option(help="Configured avatar server to use (AVATARQ_AVATAR_SERVERS)")
    ] = None,
    lead: Annotated[float | None, typer.Option(help="Seconds ahead of real time")] = None,
    metadata: Annotated[str | None, typer.Option(help="JSON object echoed in the result")] = None,
    webhook_url: Annotated[str | None, typer.Option(help="POST the final result here")] = None,
    transcript: Annotated[
        Path | None, typer.Option(help="Captions: a plain text, SRT or WebVTT file")
    ] = None,
    wait: Annotated[bool, typer.Option(help="Wait for the job to end")] = False,
    timeout: Annotated[float, typer.Option(help="Seconds to wait with --wait")] = 3600.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON, no progress bar")] = False,
) -> None:
    """Enqueue one job.

    Example: avatarq enqueue s3://clips/hello.mp3 --room lobby --avatar anna --wait
    """
    from producers import enqueue as do_enqueue

    job: dict[str, Any] = {"room": room, "avatar_id": avatar, "source": source}
    job.update(avatar_server=avatar_server, lead=lead, webhook_url=webhook_url, job_id=job_id)
    if metadata:
        try:
            job["metadata"] = json.loads(metadata)
        except ValueError as e:
            raise fail(f"--metadata is not JSON: {e}", EXIT_INVALID) from None
    if transcript is not None:
        try:
            job["transcript"] = transcript.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise fail(f"--transcript: cannot read {transcript}: {e}", EXIT_INVALID) from None
    try:
        handle = do_enqueue({k: v for k, v in job.items() if v is not None})
    except InvalidJob as e:
        raise fail(e.message, EXIT_INVALID) from None
    conclude(handle.job_id, wait=wait, timeout=timeout, as_json=as_json)


@app.command()
def status(
    job_id: Annotated[str | None, typer.Argument(help="A job (default: the whole fleet)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON")] = False,
) -> None:
    """Show a job's state (queued, playing with progress, or its final result); without a
    job id, the queue depth, workers, jobs in flight and recent failures.

    Example: avatarq status 4f2a9c
    """
    from producers import get_status

    if job_id is None:
        from avatarq_cli.commands.ops import show_overview

        show_overview(as_json=as_json)
        return
    result = get_status(job_id)
    if as_json:
        print(json.dumps(result, default=str))
    else:
        for key, value in result.items():
            err.print(f"{key}: {value}")


@app.command()
def cancel(job_id: str) -> None:
    """Cancel a job: a queued one is dropped, a playing one stops within half a second.

    Example: avatarq cancel 4f2a9c
    """
    from producers import cancel as do_cancel

    was = do_cancel(job_id)
    if was == "ended":
        raise fail(f"job {job_id} had already ended; nothing to cancel", EXIT_FAILED)
    err.print(f"cancelling job {job_id} ({was})")


@app.command()
def token(
    room: Annotated[str, typer.Option(help="Room to join")],
    identity: Annotated[str, typer.Option(help="Participant identity")] = "viewer",
    ttl: Annotated[int, typer.Option(help="Lifetime in seconds")] = 3600,
) -> None:
    """Print a join token for watching a room in a LiveKit client (subscribe only).

    Example: avatarq token --room lobby --identity viewer
    """
    from datetime import timedelta

    from livekit import api

    s = get_settings()
    jwt = (
        api.AccessToken(s.livekit_api_key, s.livekit_api_secret.get_secret_value())
        .with_identity(identity)
        .with_ttl(timedelta(seconds=ttl))
        .with_grants(api.VideoGrants(room_join=True, room=room, can_publish=False))
        .to_jwt()
    )
    print(jwt)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def worker(
    ctx: typer.Context,
    concurrency: Annotated[int | None, typer.Option(help="Jobs played at once")] = None,
    loglevel: Annotated[str, typer.Option(help="Celery log level")] = "INFO",
) -> None:
    """Start a Celery worker (`celery -A tasks worker` with avatarq's options; extra args pass
    through).

    Example: avatarq worker --concurrency 50
    """
    argv = [sys.executable, "-m", "celery", "-A", "tasks", "worker", "--loglevel", loglevel]
    if concurrency:
        argv += ["--concurrency", str(concurrency)]
    os.execv(sys.executable, [*argv, *ctx.args])


#: Modules under avatarq_cli/commands/ that add their own sub-commands.
COMMAND_MODULES: tuple[str, ...] = (
    "schedule",
    "tts",
    "bulk",
    "api",
    "ops",
    "dead",
)


def _register_commands() -> None:
    import importlib

    for name in COMMAND_MODULES:
        importlib.import_module(f"avatarq_cli.commands.{name}").register(app)
    plugins.register(app)


_register_commands()


def main() -> None:
    # Imported here: `avatarq --help` stays as light as the commands that need neither.
    from kombu.exceptions import OperationalError
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError

    from avatarq_cli.commands.ops import mask_url
    from producers.follow import JobTimeout

    try:
        app()
    except JobTimeout as e:
        raise fail(str(e), EXIT_TIMEOUT) from None
    except (RedisConnectionError, RedisTimeoutError) as e:
        where = mask_url(get_settings().redis_url)
        err.print(f"[red]error:[/] cannot reach Redis at {where} (REDIS_URL): {e}", soft_wrap=True)
        raise SystemExit(EXIT_UNAVAILABLE) from None
    except OperationalError as e:
        where = mask_url(get_settings().broker_url)
        err.print(f"[red]error:[/] cannot reach the broker at {where}: {e}", soft_wrap=True)
        raise SystemExit(EXIT_UNAVAILABLE) from None
