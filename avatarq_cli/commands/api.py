"""`avatarq api`: serve the HTTP API (producers/api.py) with uvicorn."""

from __future__ import annotations

from typing import Annotated

import typer

from avatarq_cli.commands.common import EXIT_INVALID, err


def api(
    host: Annotated[str, typer.Option(help="Interface to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port")] = 8000,
    log_level: Annotated[str, typer.Option(help="uvicorn log level")] = "info",
) -> None:
    """Serve the HTTP API (POST/GET/DELETE /jobs, SSE events, /openapi.json).

    Example: AVATARQ_API_KEYS=acme:k1,globex:k2 avatarq api --host 0.0.0.0 --port 8000
    """
    import uvicorn

    from avatarq.settings import get_settings
    from producers.api import parse_api_keys

    try:
        parse_api_keys(get_settings().api_keys.get_secret_value())
    except ValueError as e:
        err.print(f"[red]error:[/] {e}")
        raise typer.Exit(EXIT_INVALID) from None
    uvicorn.run("producers.api:create_app", factory=True, host=host, port=port, log_level=log_level)


def register(app: typer.Typer) -> None:
    app.command()(api)
