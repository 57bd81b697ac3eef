"""Run tests that start their own servers N times and count the ports their services lost.

    infra/repeat-e2e [--keep DIR] N PYTEST_ARG...   e.g. infra/repeat-e2e 20 tests/test_x.py

Whatever follows N goes to pytest. Each run is a pytest of its own inside a network namespace
of its own (infra/netns-run, unless already inside one), with every temporary file, the
services' logs included, under one directory. Counted per run: starts that lost a port to
another process and were retried (`LOST_PORT` in a service's log) and bind errors in the
report of a failed run (a loss no retry saved). Prints one line per run and a JSON summary;
exits 1 if any run failed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pydantic import BaseModel

from avatarq_dev import netns
from avatarq_dev.processes import BIND_ERROR, LOST_PORT

NETNS_RUN = Path(__file__).resolve().parent.parent / "infra" / "netns-run"


class Run(BaseModel):
    index: int
    passed: bool
    seconds: float
    #: Starts of a service that lost a port and were retried on new ones.
    lost_ports_retried: int
    #: Bind errors in the report of a failed run: losses no retry saved.
    bind_errors_failing: int


def run_once(index: int, pytest_args: list[str], root: Path, timeout_s: float) -> Run:
    tmp = root / f"run-{index:03d}"
    tmp.mkdir(parents=True)
    argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    argv += [f"--basetemp={tmp / 'pytest'}", *pytest_args]
    if not netns.inside():
        argv = ["bash", str(NETNS_RUN), *argv]
    started = time.monotonic()
    # TMPDIR: services started without a log directory log to a temporary one, here too.
    proc = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        env={**os.environ, "TMPDIR": str(tmp)},
        timeout=timeout_s,
        check=False,
    )
    (tmp / "pytest.out").write_text(proc.stdout + proc.stderr)
    logs = [path.read_text(errors="replace") for path in tmp.rglob("*.log")]
    report = proc.stdout + proc.stderr if proc.returncode else ""
    return Run(
        index=index,
        passed=proc.returncode == 0,
        seconds=round(time.monotonic() - started, 1),
        lost_ports_retried=sum(log.count(LOST_PORT) for log in logs),
        bind_errors_failing=len(BIND_ERROR.findall(report)),
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", type=int, help="how many runs (at most 1000)")
    p.add_argument("pytest_args", nargs=argparse.REMAINDER, help="tests and pytest options")
    p.add_argument("--run-timeout", type=float, default=1800.0, help="seconds per run")
    p.add_argument("--keep", type=Path, help="keep the runs' files here (default: a temp dir)")
    args = p.parse_args(argv)
    if not 1 <= args.runs <= 1000 or not args.pytest_args:
        p.error("give 1 to 1000 runs and the tests to run")
    root = args.keep or Path(tempfile.mkdtemp(prefix="avatarq-repeat-"))
    runs = []
    for index in range(1, args.runs + 1):
        run = run_once(index, args.pytest_args, root, args.run_timeout)
        runs.append(run)
        print(
            f"run {index}/{args.runs}: {'passed' if run.passed else 'FAILED'} in {run.seconds}s, "
            f"ports lost and retried: {run.lost_ports_retried}, "
            f"bind errors failing it: {run.bind_errors_failing}",
            flush=True,
        )
    summary = {
        "runs": len(runs),
        "failed": sum(not r.passed for r in runs),
        "lost_ports_retried": sum(r.lost_ports_retried for r in runs),
        "bind_errors_failing": sum(r.bind_errors_failing for r in runs),
        "files": str(root),
    }
    print(json.dumps(summary))
    return 1 if summary["failed"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
