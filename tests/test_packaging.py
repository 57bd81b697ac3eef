"""`pip install .` is the lean worker/producer install: the built wheel holds the shipped
packages and their data, not the dev stack (devstack/, its own distribution), and declares
none of the dev stack's dependencies."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: What only the dev stack needs (devstack/pyproject.toml).
_CACHES = shutil.ignore_patterns("__pycache__", "*.pyc")
#: The packages of the wheel: the ground floor, producers, worker and the CLI on the roof.
SHIPPED = {"avatarq", "producers", "tasks", "avatarq_cli"}
DEV_ONLY = {"aiortc", "livekit-agents", "livekit-protocol", "matplotlib", "py-spy", "psutil"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    out = tmp_path_factory.mktemp("wheel")
    # Built from a copy of what the project's pyproject.toml packages: setuptools reuses a
    # checkout's build/ directory, where files deleted since would still be picked up.
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for package in SHIPPED:
        shutil.copytree(ROOT / package, source / package, ignore=_CACHES)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(out), str(source)],
        check=True,
        cwd=source,
        timeout=180,
    )  # fmt: skip
    (path,) = out.glob("avatarq-*.whl")
    return zipfile.ZipFile(path)


def test_the_wheel_ships_the_worker_and_producers_without_the_dev_stack(
    wheel: zipfile.ZipFile,
) -> None:
    names = wheel.namelist()
    tops = {n.split("/")[0] for n in names if not n.startswith("avatarq-")}
    assert tops == SHIPPED, tops
    assert not [n for n in names if "avatarq_dev" in n or n.startswith("avatarq/dev/")]
    # The package data a worker needs at run time.
    assert "avatarq/ledger/lua/claim.lua" in names
    assert "avatarq/assets/sample.ogg" in names
    # The `avatarq` script runs the CLI on the roof.
    (points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    assert "avatarq = avatarq_cli.app:main" in wheel.read(points).decode()


def test_the_wheel_declares_no_dev_stack_dependency(wheel: zipfile.ZipFile) -> None:
    (meta,) = [n for n in wheel.namelist() if n.endswith(".dist-info/METADATA")]
    headers = Parser().parsestr(wheel.read(meta).decode())
    required = {
        r.split(";")[0].split("[")[0].split(">")[0].split("<")[0].split("=")[0].strip().lower()
        for r in headers.get_all("Requires-Dist") or []
        if "extra ==" not in r
    }
    assert "livekit" in required and "celery" in required
    assert not required & DEV_ONLY, required & DEV_ONLY
