"""The CLI when Redis is unreachable, or the dev stack is not installed: one clear line and an
exit code, not a traceback (Redis: its own code, not the one for "the job failed")."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from avatarq_cli.commands.common import EXIT_FAILED, EXIT_UNAVAILABLE
from tests.ports import refused_port
from tests.producing import avatarq

pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize(
    "args",
    [
        ("enqueue", "s3://clips/a.wav", "--room", "lobby", "--avatar", "anna"),
        ("status", "some-job"),
        ("cancel", "some-job"),
    ],
)
def test_unreachable_redis_is_one_line_and_exit_4(args: tuple[str, ...]) -> None:
    with refused_port() as port:
        dead = f"redis://:hunter2@127.0.0.1:{port}/0"
        proc = avatarq(*args, env={"REDIS_URL": dead}, timeout=60)
    assert proc.returncode == EXIT_UNAVAILABLE == 4
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "cannot reach Redis at redis://:********@127.0.0.1:" in lines[0]
    assert "hunter2" not in proc.stderr + proc.stdout


#: A `sitecustomize` that makes the named top-level modules unimportable, as on an install
#: without them (a lean worker/producer install has no dev stack and none of its dependencies).
BLOCKER = """
import sys

class Blocked:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {blocked!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)

sys.meta_path.insert(0, Blocked())
"""


def without(tmp_path: Path, *modules: str) -> dict[str, str]:
    """The environment of an `avatarq` process in which `modules` cannot be imported."""
    (tmp_path / "sitecustomize.py").write_text(BLOCKER.format(blocked=set(modules)))
    path = os.pathsep.join(p for p in (str(tmp_path), os.environ.get("PYTHONPATH")) if p)
    return {"PYTHONPATH": path}


@pytest.mark.parametrize(
    "args",
    [
        ("demo", "--json"),
        ("demo", "--netns"),
        ("dev", "livekit", "--port", "0"),
        ("dev", "avatar", "--port", "0"),
        ("faults", "--only", "corrupt_audio"),
        ("bench", "--quick"),
    ],
)
def test_dev_commands_without_the_dev_stack_say_how_to_install_it(
    tmp_path: Path, args: tuple[str, ...]
) -> None:
    proc = avatarq(*args, env=without(tmp_path, "avatarq_dev"), timeout=60)
    assert proc.returncode == EXIT_FAILED == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "needs the dev stack (avatarq-dev), which is not installed" in lines[0]
    assert "pip install ./devstack" in lines[0] and "make bootstrap" in lines[0]
    assert f"avatarq {args[0]}" in lines[0]


def test_a_missing_dependency_of_the_dev_stack_is_named(tmp_path: Path) -> None:
    proc = avatarq("bench", "--quick", env=without(tmp_path, "psutil"), timeout=60)
    assert proc.returncode == EXIT_FAILED
    (line,) = proc.stderr.strip().splitlines()
    assert "avatarq bench needs psutil, a dependency of the dev stack (avatarq-dev)" in line
    assert "pip install ./devstack" in line


def test_the_other_commands_work_without_the_dev_stack(tmp_path: Path) -> None:
    blocked = without(tmp_path, "avatarq_dev", "aiortc", "numpy", "psutil", "matplotlib")
    proc = avatarq("--help", env=blocked, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "demo" in proc.stdout and "faults" in proc.stdout
    proc = avatarq("config", "--json", env=blocked, timeout=60)
    assert proc.returncode == 0, proc.stderr
