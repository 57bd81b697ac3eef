"""`avatarq` sub-commands beyond the core ones, one module per area.

Each module exposes `register(app: typer.Typer) -> None`; `avatarq_cli/app.py` lists them in
`COMMAND_MODULES`.
"""
