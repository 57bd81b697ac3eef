"""The dev stack's commands reach `avatarq` through the `avatarq.commands` entry-point group
(avatarq_cli/plugins.py), not through imports: what devstack/pyproject.toml declares is what
the CLI expects, and the group, whatever it holds, is what `avatarq` runs."""

from __future__ import annotations

import importlib
import tomllib
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner, Result

from avatarq_cli import plugins

ROOT = Path(__file__).resolve().parents[1]


def declared() -> dict[str, str]:
    project = tomllib.loads((ROOT / "devstack" / "pyproject.toml").read_text())["project"]
    return dict(project["entry-points"][plugins.GROUP])


def test_the_dev_stack_declares_the_commands_the_cli_expects_of_it() -> None:
    points = declared()
    assert tuple(points) == plugins.DEV_STACK_COMMANDS
    for target in points.values():
        module, _, attr = target.partition(":")
        assert isinstance(getattr(importlib.import_module(module), attr), typer.Typer), target


def run(monkeypatch: pytest.MonkeyPatch, found: list[EntryPoint], *args: str) -> Result:
    """`avatarq ARGS` on a CLI whose entry-point group holds `found`."""
    monkeypatch.setattr(plugins, "entry_points", lambda group: found)
    cli = typer.Typer()
    cli.command()(lambda: None)  # a second command: the group stays a group
    plugins.register(cli)
    return CliRunner().invoke(cli, list(args), prog_name="avatarq")


def test_every_command_of_the_group_is_listed_and_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    found = [EntryPoint(n, v, plugins.GROUP) for n, v in declared().items()]
    result = run(monkeypatch, found, "--help")
    assert result.exit_code == 0, result.output
    assert all(name in result.output for name in plugins.DEV_STACK_COMMANDS)
    # Loaded only now, and everything after the name is its own: its options, --help too.
    result = run(monkeypatch, found, "dev", "--help")
    assert result.exit_code == 0, result.output
    assert "livekit" in result.output and "avatar" in result.output


def test_a_command_of_the_dev_stack_that_is_not_installed_says_how_to_install_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    result = run(monkeypatch, [], "faults", "--only", "corrupt_audio")
    assert result.exit_code == 1
    line = " ".join(result.output.split())
    assert "avatarq faults needs the dev stack (avatarq-dev), which is not installed" in line
    assert "pip install ./devstack" in line
