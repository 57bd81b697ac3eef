"""`avatarq demo`, the README's first command, end to end: the whole local stack plays the
bundled clip and the summary reports what the avatar played and what the metrics counted."""

from __future__ import annotations

import json
import subprocess
import sys
import wave

import pytest

from tests.netns import NETNS

pytestmark = NETNS


@pytest.mark.timeout(240)
def test_demo_plays_the_sample_and_reports_it() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "avatarq_cli", "demo", "--json"],
        capture_output=True,
        text=True,
        timeout=200,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    assert summary["status"] == "completed"
    assert summary["playback_position"] == pytest.approx(summary["audio_seconds"], abs=0.15)
    assert summary["real_time_factor"] >= 0.9  # played in real time, not faster
    assert summary["metrics_jobs_completed"] == 1.0
    with wave.open(summary["received_wav"]) as w:
        assert w.getnframes() / w.getframerate() == pytest.approx(summary["audio_seconds"], abs=0.1)
