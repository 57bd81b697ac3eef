"""The CLI when Redis is unreachable: one clear line and its own exit code, not a traceback
and not the code for "the job failed"."""

from __future__ import annotations

import pytest

from avatarq.commands.common import EXIT_UNAVAILABLE
from avatarq_dev.processes import free_port
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
    dead = f"redis://:hunter2@127.0.0.1:{free_port()}/0"  # nothing listens there
    proc = avatarq(*args, env={"REDIS_URL": dead}, timeout=60)
    assert proc.returncode == EXIT_UNAVAILABLE == 4
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "cannot reach Redis at redis://:********@127.0.0.1:" in lines[0]
    assert "hunter2" not in proc.stderr + proc.stdout
