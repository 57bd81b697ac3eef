"""`avatarq bench` must not silently rot: its smallest runs return numbers under the
documented keys, and its drift estimate reads the emulator's record the right way."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

from avatarq.dev.bench import QUICK, report, run
from avatarq.dev.bench.streams import Played, drift_ms, warm_start

TINY = dataclasses.replace(QUICK, decode_seconds=2, queue_jobs=20)


def test_decode_and_queue_sections_return_numbers(tmp_path: Path) -> None:
    results = run(TINY, ("decode", "queue"), workdir=tmp_path)
    assert isinstance(results["decode_x_realtime"], float) and results["decode_x_realtime"] > 0
    assert set(results["decode"]["formats"]) == {"wav", "mp3", "m4a", "ogg"}
    for key in ("enqueue_single_jobs_per_s", "enqueue_bulk_jobs_per_s"):
        assert results["queue"][key] > 0
    assert results["machine"]["cores"] >= 1
    table = report.text_table(results)
    assert "decode+resample, slowest format" in table and "enqueue, bulk" in table


def test_cli_prints_one_json_object() -> None:
    # The command as users run it (typer wiring, --json), on the cheapest section.
    done = subprocess.run(
        [sys.executable, "-m", "avatarq", "bench", "--quick", "--json", "--sections", "queue"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    results = json.loads(done.stdout)
    assert results["plan"] == "quick" and results["enqueue_jobs_per_s"] > 0


def test_drift_is_the_change_of_audio_ahead_of_the_wall_clock() -> None:
    steady = [0.6] * 100
    assert drift_ms({"ahead_s": [0.1, 0.5, *steady, 0.2]}) == 0.0
    # A sender losing 1 ms per second: the buffer sinks by ~70 ms between the two windows.
    sinking = [0.6 - 0.001 * i for i in range(100)]
    assert 60 < -drift_ms({"ahead_s": [0.1, 0.5, *sinking, 0.2]}) < 80
    assert math.isnan(drift_ms({"ahead_s": [0.5]}))


def test_warm_start_compares_kept_sessions_with_cold_starts() -> None:
    def run(picked: float, first_byte: float, warm: bool) -> Played:
        # A warm job's room_joined is when it took the kept link.
        ts = {"picked": picked, "room_joined": picked + 0.03, "first_byte": first_byte}
        return Played(0.0, {"status": "completed", "warm": warm, "timestamps": ts}, None)

    cold = [run(0, 1.2, False), run(0, 1.0, False)]
    warm = [run(5, 5.1, True), run(5, 5.2, True), run(9, 10.5, False)]  # the last one went cold
    figures = warm_start(cold, warm)
    assert figures["warm_start"]["warm_start_s"]["n"] == 2
    assert figures["warm_start_overhead_p50_s"] < figures["warm_start"]["cold_start_s"]["p50"]
    assert 0 < figures["warm_start"]["ratio_warm_vs_cold"] < 0.5
    assert figures["warm_start"]["warm_picked_to_link_s"]["p50"] == 0.03
    assert figures["warm_start"]["warm_link_to_first_byte_s"]["n"] == 2
