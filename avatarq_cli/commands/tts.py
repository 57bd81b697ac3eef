"""`avatarq say TEXT`: render speech once (cached by content hash) and enqueue it as a job."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from avatarq.errors import InvalidJob, JobError
from avatarq_cli.commands.common import EXIT_FAILED, EXIT_INVALID, conclude, fail


def say(
    text: Annotated[str, typer.Argument(metavar="TEXT", help="What to say (SSML with --ssml)")],
    room: Annotated[str, typer.Option(help="LiveKit room name")],
    avatar: Annotated[str, typer.Option(help="Avatar id (participant avatar-<id>)")],
    engine: Annotated[str, typer.Option(help="espeak (offline), openai or elevenlabs")] = "espeak",
    voice: Annotated[str | None, typer.Option(help="Engine voice (default: engine's)")] = None,
    language: Annotated[str | None, typer.Option(help="Language, e.g. en-US")] = None,
    ssml: Annotated[bool, typer.Option(help="TEXT is SSML (espeak only)")] = False,
    job_id: Annotated[str | None, typer.Option(help="Idempotency key (default: random)")] = None,
    wait: Annotated[bool, typer.Option(help="Wait for the job to end")] = False,
    timeout: Annotated[float, typer.Option(help="Seconds to wait with --wait")] = 3600.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON, no progress bar")] = False,
) -> None:
    """Render TEXT with a TTS engine, store it, and enqueue a job that plays it.

    Example: avatarq say "The lobby closes in ten minutes" --room lobby --avatar anna --wait
    """
    from producers import enqueue

    source: dict[str, Any] = {"type": "tts", "text": text, "engine": engine, "ssml": ssml}
    source.update({k: v for k, v in (("voice", voice), ("language", language)) if v})
    job: dict[str, Any] = {"room": room, "avatar_id": avatar, "source": source}
    if job_id:
        job["job_id"] = job_id
    try:
        handle = enqueue(job)
    except InvalidJob as e:
        raise fail(e.message, EXIT_INVALID) from None
    except JobError as e:
        # The engine refused or stayed unavailable: nothing was enqueued.
        raise fail(f"{e.reason}: {e.message}", EXIT_FAILED) from None
    conclude(handle.job_id, wait=wait, timeout=timeout, as_json=as_json)


def register(app: typer.Typer) -> None:
    app.command()(say)
