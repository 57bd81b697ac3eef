"""The code blocks fenced as ```bash runnable in the README and in docs/*.md run and succeed,
as a new user would type them: the `avatarq` of this checkout on PATH, a throwaway Redis, no
`.env.local`."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUNNABLE = re.compile(r"^```bash runnable\n(.*?)^```$", re.M | re.S)
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCKS = [
    (page.relative_to(ROOT).as_posix(), block)
    for page in PAGES
    for block in RUNNABLE.findall(page.read_text())
]


def test_readme_has_runnable_blocks() -> None:
    assert len([page for page, _ in BLOCKS if page == "README.md"]) >= 2


@pytest.mark.parametrize(
    ("page", "block"), BLOCKS, ids=[f"{page}: {b.splitlines()[0]}" for page, b in BLOCKS]
)
def test_readme_block_runs(page: str, block: str, redis_server: str, tmp_path: Path) -> None:
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "REDIS_URL": redis_server,
    }
    # A fresh directory: no .env.local of the developer's leaks into the example.
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", block],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    output = f"--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"
    assert result.returncode == 0, f"{page}:\n{block}\n{output}"
