"""`avatarq bench` must not silently rot: its smallest runs return numbers under the
documented keys, and its drift estimate reads the emulator's record the right way."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from avatarq.settings import get_settings
from avatarq_dev.bench import PACING_GOAL_STREAMS, QUICK, queue, report, run, scale, sender_keys
from avatarq_dev.bench.load import light_avatars
from avatarq_dev.bench.streams import Played, drift_ms, warm_start
from avatarq_dev.stack import LocalStack, local_stack
from tasks.link import room as rooms
from tasks.link import tokens
from tasks.link.avatar import HttpAvatarClient
from tasks.link.pacing import Pacer
from tasks.link.stream import AudioStreamSender
from tests.netns import needs_netns

TINY = dataclasses.replace(QUICK, decode_seconds=2, queue_jobs=20)


def test_decode_and_queue_sections_return_numbers(tmp_path: Path) -> None:
    results = run(TINY, ("decode", "queue"), workdir=tmp_path)
    assert isinstance(results["decode_x_realtime"], float) and results["decode_x_realtime"] > 0
    assert set(results["decode"]["formats"]) == {"wav", "mp3", "m4a", "ogg"}
    for key in ("enqueue_single_jobs_per_s", "enqueue_bulk_jobs_per_s"):
        assert results["queue"][key] > 0
    # Taking a free avatar session slot: one Lua round trip, compared with a PING.
    quota = results["quota"]
    assert quota["rounds"] == 20 and 0 < quota["slot_take_p50_ms"] <= quota["slot_take_p99_ms"]
    assert results["slot_take_p50_ms"] == quota["slot_take_p50_ms"]
    assert results["machine"]["cores"] >= 1
    table = report.text_table(results)
    assert "decode+resample, slowest format" in table and "enqueue, bulk" in table


def test_cli_prints_one_json_object() -> None:
    # The command as users run it (typer wiring, --json), on the cheapest section.
    done = subprocess.run(
        [sys.executable, "-m", "avatarq_cli", "bench", "--quick", "--json", "--sections", "queue"],
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


def test_quick_plan_ramps_past_the_pacing_goal_and_names_every_cpu_key() -> None:
    # The quick plan must show a streams-per-process figure, not stop at 10.
    assert max(QUICK.ramp) >= PACING_GOAL_STREAMS and len(QUICK.ramp) >= 3
    sender = {
        "ours": {"cpu_percent_per_stream": 1.2},
        "ours_unpaced": {"cpu_percent_per_stream": 0.9},
        "agents": {"error": ["a configuration failed"]},
    }
    assert sender_keys(sender) == {
        "cpu_per_stream_pct": 1.2,
        "cpu_per_stream_unpaced_pct": 0.9,
        "cpu_per_stream_agents_pct": None,
    }


@needs_netns
def test_light_receiver_speaks_the_avatar_protocol(tmp_path: Path) -> None:
    """The bench's load receiver, on the official server where it runs: the worker's readiness
    probe, a segment played in real time and reported, a stop that clears the buffer."""
    with (
        local_stack(tmp_path / "stack") as stack,
        queue.settings_env(stack.env()),
        light_avatars(stack, processes=2) as light,
    ):
        asyncio.run(asyncio.wait_for(_speak_to_light_receiver(stack, light.url), 60))


async def _speak_to_light_receiver(stack: LocalStack, url: str) -> None:
    settings = get_settings()
    ttl = tokens.ttl_for(10.0, settings)
    t = tokens.mint(settings, room="light", worker_identity="w", avatar_identity="a", ttl=ttl)
    other = tokens.mint(settings, room="light", worker_identity="w2", avatar_identity="a2", ttl=ttl)
    room = await rooms.connect(settings.livekit_url, t.worker)
    stranger = await rooms.connect(settings.livekit_url, other.worker)
    client = HttpAvatarClient("light", url, stack.license_key)
    try:
        session = await client.start(
            livekit_url=settings.livekit_url,
            livekit_token=t.avatar,
            avatar_id="bench",
            avatar_identity="a",
        )
        await rooms.wait_for_avatar(room, "a", timeout=20)
        await rooms.wait_until_listening(room, "a", timeout=10)
        answer = await stranger.local_participant.perform_rpc(
            destination_identity="a", method="lk.clear_buffer", payload=""
        )
        assert answer == "reject"  # bound to its token's sender only

        sender = AudioStreamSender(room, "a", 16000)
        chunk = bytes(12800)  # 400 ms of 16 kHz s16 mono

        async def pcm(n: int) -> AsyncIterator[bytes]:
            for _ in range(n):
                yield chunk

        await sender.send_segment(pcm(5), Pacer(32000, lead=0.5))
        ended = time.monotonic()
        finished = await sender.wait_playback_finished(5)
        assert finished is not None and not finished.interrupted
        assert finished.playback_position == pytest.approx(2.0, abs=0.01)
        # The last chunk left in 100 ms pieces: the avatar held the lead plus one piece, not
        # plus a whole 400 ms chunk.
        assert time.monotonic() - ended < 0.5 + 0.1 + 0.2
        sidecar = json.loads((stack.recordings / f"{session.session_id}.json").read_text())
        played = sidecar["segments"][0]
        assert played["received_s"] == pytest.approx(2.0) and played["underruns"] == []
        assert played["playback_finished_at"] - played["first_frame_at"] >= 2.0 - 0.05

        stop = asyncio.Event()

        async def stop_after_first_write(_sent: int) -> None:
            stop.set()  # the sender clears the avatar's buffer before closing

        sent = await sender.send_segment(
            pcm(20), Pacer(32000, lead=0.0), on_progress=stop_after_first_write, stop=stop
        )
        cut = await sender.wait_playback_finished(5)
        assert sent == len(chunk) and cut is not None and cut.interrupted
        assert await client.stop(session)
    finally:
        await client.aclose()
        await rooms.disconnect(stranger)
        await rooms.disconnect(room)


def test_bursts_report_the_median_drain_and_the_worst_guarantees() -> None:
    from avatarq_dev.bench.fleet import bursts_summary

    def burst(drain: float, peak: int, completed: int, order: bool) -> dict[str, object]:
        return {
            "drain_s": drain,
            "ratio_drain_vs_ideal": drain / 8,
            "peak_sessions": peak,
            "completed": completed,
            "retried_jobs": 1,
            "order_exact": order,
        }

    summary = bursts_summary(
        [burst(10.2, 4, 32, True), burst(9.6, 5, 32, True), burst(9.9, 4, 31, False)]
    )
    assert summary["drain_s"] == 9.9 and summary["ratio_drain_vs_ideal"] == 9.9 / 8
    assert summary["drain_s_rounds"] == [9.6, 9.9, 10.2] and summary["rounds"] == 3
    assert summary["peak_sessions"] == 5 and summary["completed"] == 31
    assert summary["retried_jobs"] == 3 and summary["order_exact"] is False


def test_the_sampler_says_how_busy_the_cores_were_in_a_window() -> None:
    """The fleet's burst reports how busy the shared cores were while it drained: what the
    sampler counts, and only inside the window."""
    from avatarq_dev.bench.stats import ProcessSampler

    with ProcessSampler({}, period=0.05) as sampler:
        deadline = time.monotonic() + 0.5
        while time.monotonic() < deadline:  # keep one core busy
            pass
    assert len(sampler.machine) >= 3
    assert all(0.0 <= busy <= 100.0 for _, busy in sampler.machine)
    assert sampler.busy(0, time.time())["p50"] > 0

    sampler.machine = [(1.0, 20.0), (2.0, 95.0), (3.0, 100.0), (4.0, 50.0), (9.0, 100.0)]
    busy = sampler.busy(1.0, 4.0)
    assert busy == {"p50": 95.0, "p90": 100.0, "saturated_share": 0.5, "n": 4}


def test_scale_figures_take_the_tightest_limit() -> None:
    # 10 streams: 2 % of a core each in all, 1 % on the network thread, 0.5 % in Python.
    step = {
        "streams": 10,
        "worker_cpu_percent": 20.0,
        "worker_rss_mb": 220.0,
        "worker_threads_cpu_percent": {"network_thread": 10.0, "python3": 5.0, "tokio": 5.0},
    }
    plan = scale.node_plan(step, idle_rss_mb=120.0)
    assert plan["process_limited_by"] == "network_thread" and plan["process_limit_streams"] == 80
    one, *_, sixteen = plan["rows"]
    assert one == {
        "processes": 1,
        "streams_per_process": 80,
        "streams_per_node": 80,
        "limited_by": "per-process limit",
    }
    # 16 cores at 80 % hold 640 streams of 2 %: the node's cores, not the processes, bind.
    assert sixteen["streams_per_node"] == 640 and sixteen["limited_by"] == "cores"
