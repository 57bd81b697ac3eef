"""`avatarq demo --keep`: after the demo job the stack stays up, the console is served with a key
printed in its URL, the demo's job is there as completed, and SIGTERM shuts everything down."""

from __future__ import annotations

import queue
import re
import signal
import subprocess
import sys
import threading
import time

import pytest
import requests

from tests.netns import NETNS

pytestmark = NETNS

CONSOLE_LINE = re.compile(r"console: (http://[\d.]+:(\d+))/console/#key=(\S+)")


@pytest.mark.timeout(240)
def test_demo_keep_serves_the_console_until_stopped() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "avatarq_cli", "demo", "--keep"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: queue.Queue[str] = queue.Queue()
    assert proc.stderr is not None
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stderr], daemon=True).start()
    try:
        deadline, seen, match = time.monotonic() + 180, [], None
        while match is None and time.monotonic() < deadline and proc.poll() is None:
            try:
                seen.append(lines.get(timeout=1))
            except queue.Empty:
                continue
            match = CONSOLE_LINE.search(seen[-1])
        assert match, "no console URL printed:\n" + "".join(seen[-30:])
        base, key = match.group(1), match.group(3)
        assert "status: completed" in "".join(seen)

        page = requests.get(f"{base}/console/", timeout=10)
        assert page.status_code == 200 and "avatarq console" in page.text
        overview = requests.get(
            f"{base}/console/api/overview", headers={"X-API-Key": key}, timeout=10
        ).json()
        # Played in the key's tenant's own room (`demo:demo`), shown under its short name.
        assert [(e["status"], e["room"]) for e in overview["recent"]] == [("completed", "demo")]
        assert requests.get(f"{base}/console/api/overview", timeout=10).status_code == 401
    finally:
        proc.send_signal(signal.SIGTERM)
        returncode = proc.wait(60)
    assert returncode == 0
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{base}/console/", timeout=5)
