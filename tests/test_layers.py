"""The layering the code promises: import contracts (pyproject.toml, import-linter), and
entry modules that import on their own, in a fresh interpreter, in any order."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_hold() -> None:
    lint = Path(sys.executable).parent / "lint-imports"
    proc = subprocess.run([str(lint)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "0 broken" in proc.stdout


@pytest.mark.parametrize(
    "module",
    [
        "avatarq_cli.commands.bulk",  # once a circular import through avatarq_cli.app
        "avatarq_cli.commands.tts",
        "avatarq_cli.commands.api",
        "producers.beat",  # once raised at import without AVATARQ_SCHEDULE_FILE
        "tasks",
        "tasks.toolkit",
        "avatarq_dev.demo",
        "avatarq_dev.faults",
        "avatarq_dev.bench",
    ],
)
def test_module_imports_on_its_own(module: str) -> None:
    # The dev stack from this checkout, installed or not (cwd gives the other packages).
    env = {"PATH": "/usr/bin:/bin", "HOME": str(ROOT), "PYTHONPATH": str(ROOT / "devstack")}
    proc = subprocess.run(
        [sys.executable, "-c", f"import {module}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_producers_load_no_livekit_and_no_ffmpeg() -> None:
    code = (
        "import sys, producers, producers.api, producers.beat;"
        "heavy = [m for m in sys.modules if m.split('.')[0] in ('livekit', 'ffmpeg', 'tasks')];"
        "print(heavy); sys.exit(1 if heavy else 0)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
