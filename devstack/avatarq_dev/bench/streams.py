"""Sections 1–3: real jobs on the local stack (producer → Redis → celery worker → LiveKit room
→ avatar emulator): start/end overhead, pacing drift on the receiving side, and how many
streams one worker process plays without an underrun, versus the prefork baseline.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from avatarq.settings import Settings
from avatarq_dev.bench.stats import ProcessSampler, pct, ratio, spread
from avatarq_dev.stack import LocalStack
from tasks.toolkit import CHUNK_SECONDS

POLL_S = 0.5
#: Results and sidecars of a job that ended are read for this long before giving up.
SIDECAR_WAIT_S = 5.0
#: Seconds at each end of the long job whose median `ahead_s` is compared.
DRIFT_WINDOW_S = 30
#: The drift plot's resolution: the worst write of each such span of audio.
TRACE_WINDOW_S = 2.0
#: A ramp step's CPU window: while this share of its streams play at once.
PLAYING_SHARE = 0.9
#: Jobs of a ramp step arrive at this rate, as a busy queue feeds a worker: a hundred
#: room joins, keepers and avatar starts in the same second measure the join storm, not the
#: streams (the figures are taken once nearly all of them play).
STARTS_PER_S = 5.0
#: Pacing goal of a ramp step (besides no underrun): schedule error p99 below this.
SCHEDULE_P99_GOAL_MS = 20.0


@dataclass
class Played:
    enqueued_at: float
    result: dict[str, Any]
    segment: dict[str, Any] | None  # the emulator's record of the job's one audio segment


def submit(
    rooms: list[str],
    clip: Path,
    lead: float,
    *,
    per_second: float | None = None,
    settings: Settings | None = None,
) -> list[tuple[Any, float]]:
    """Enqueue one job per room, all at once or `per_second` of them each second (through
    `settings`' broker, else the environment's)."""
    from producers import enqueue

    handles = []
    began = time.monotonic()
    for i, room in enumerate(rooms):
        if per_second:
            time.sleep(max(0.0, began + i / per_second - time.monotonic()))
        at = time.time()
        job = {"room": room, "avatar_id": "anna", "source": str(clip), "lead": lead}
        handles.append((enqueue(job, settings=settings), at))
    return handles


def collect(stack: LocalStack, handles: list[tuple[Any, float]], timeout: float) -> list[Played]:
    """Wait (at most `timeout`) for every job to end; pair each result with its segment."""
    from producers import get_status
    from producers.client import is_terminal

    deadline = time.monotonic() + timeout
    results: dict[str, dict[str, Any]] = {}
    while len(results) < len(handles) and time.monotonic() < deadline:
        for handle, _ in handles:
            if handle.job_id not in results:
                status = get_status(handle.job_id)
                if is_terminal(status):
                    results[handle.job_id] = status
        time.sleep(POLL_S)
    return [
        Played(
            at, results.get(h.job_id, {"status": "timeout"}), _segment(stack, results.get(h.job_id))
        )
        for h, at in handles
    ]


def _segment(stack: LocalStack, result: dict[str, Any] | None) -> dict[str, Any] | None:
    session = (result or {}).get("avatar_session_id")
    if not session:
        return None
    path = stack.recordings / f"{session}.json"
    deadline = time.monotonic() + SIDECAR_WAIT_S
    while time.monotonic() < deadline:
        try:
            segments = json.loads(path.read_text())["segments"]
            if segments and segments[0].get("playback_finished_at"):
                return dict(segments[0])
        except (OSError, ValueError, KeyError):
            pass  # not written yet (the emulator saves when the segment finishes)
        time.sleep(0.1)
    return None


def drift_ms(segment: dict[str, Any]) -> float:
    """Receiver-side drift over the segment: how much the audio received ahead of the wall
    clock (the emulator's per-second `ahead_s`, which a sender keeping time holds at its lead)
    changed between the start and the end of the segment. Medians over a window at each end
    (after the lead's burst, before the last partial second) keep one late frame from counting.
    """
    ahead = segment.get("ahead_s") or []
    steady = ahead[2:-1]
    window = max(1, min(DRIFT_WINDOW_S, len(steady) // 4))
    if len(steady) < 2 * window:
        return float("nan")
    return (statistics.median(steady[-window:]) - statistics.median(steady[:window])) * 1000


def _completed(runs: list[Played]) -> list[Played]:
    return [r for r in runs if r.result.get("status") == "completed"]


def overhead(runs: list[Played], lead: float) -> dict[str, Any]:
    """Section 1 from the jobs' timestamps (epoch seconds in the result)."""
    done = [r for r in _completed(runs) if r.result["timestamps"].get("playback_finished")]
    pickup, join, start, avatar, end, stream = [], [], [], [], [], []
    for r in done:
        ts = r.result["timestamps"]
        # A warm start asks for no avatar: it was ready when its link was.
        avatar_s = ts["avatar_ready"] - (ts.get("avatar_requested") or ts["avatar_ready"])
        pickup.append(ts["picked"] - r.enqueued_at)
        join.append(ts["room_joined"] - ts["picked"])
        avatar.append(avatar_s)
        # The worker's own start: everything from pick-up to first byte but the avatar's start.
        start.append(ts["first_byte"] - ts["picked"] - avatar_s)
        end.append(ts["playback_finished"] - ts["last_byte"])
        stream.append(ts["last_byte"] - ts["first_byte"])
    start_s, end_s, avatar_spread = spread(start), spread(end), spread(avatar)
    return {
        "start_overhead_p50_s": start_s["p50"],
        "overhead": {
            "jobs": len(runs),
            "completed": len(done),
            "lead_s": lead,
            "pickup_latency_s": spread(pickup),
            "start_overhead_s": start_s,
            "avatar_start_s": avatar_spread,
            "end_overhead_s": end_s,
            "streaming_s": spread(stream),
            # Part of the start overhead: source probe, first decoded chunk, room join.
            "picked_to_room_joined_s": spread(join),
            # Baselines: the avatar's own start (outside our control) and the lead (the audio
            # the avatar still has to play when the last byte leaves).
            "ratio_start_vs_avatar_start": ratio(start_s["p50"], avatar_spread["p50"]),
            "ratio_end_vs_lead": ratio(end_s["p50"], lead),
            "goal_start_below_s": 1.0,
            "goal_end_below_s": round(lead + 0.3, 3),
        },
    }


def warm_start(cold: list[Played], warm: list[Played]) -> dict[str, Any]:
    """Start overhead (picked → first byte, avatar start included) of jobs that started the
    avatar (cold) versus the next job of the same rooms, played on the kept session (warm)."""

    def starts(runs: list[Played], want_warm: bool) -> list[float]:
        return [
            r.result["timestamps"]["first_byte"] - r.result["timestamps"]["picked"]
            for r in _completed(runs)
            if bool(r.result.get("warm")) is want_warm
        ]

    cold_s, warm_s = spread(starts(cold, False)), spread(starts(warm, True))
    # Where a warm start's time goes: before the kept link is taken (decoder start, first
    # chunk) and after it (segment stream opened, first write).
    kept = [r.result["timestamps"] for r in _completed(warm) if r.result.get("warm")]
    return {
        "warm_start_overhead_p50_s": warm_s["p50"],
        "warm_start": {
            "cold_start_s": cold_s,
            "warm_start_s": warm_s,
            "warm_picked_to_link_s": spread([t["room_joined"] - t["picked"] for t in kept]),
            "warm_link_to_first_byte_s": spread([t["first_byte"] - t["room_joined"] for t in kept]),
            "ratio_warm_vs_cold": ratio(warm_s["p50"], cold_s["p50"]),
            "goal_warm_below_s": 0.1,
        },
    }


def drift(run: Played) -> dict[str, Any]:
    """Section 2 for the long job: receiver drift and the sender's schedule error over time.
    Baseline: the drift the same timer lateness would have added up to with summed sleeps
    (each chunk's lateness carried into every later one)."""
    errors = run.result.get("pacing_errors_ms") or []
    value = drift_ms(run.segment) if run.segment else float("nan")
    summed = sum(errors)
    # Whole chunks per point of the trace, about TRACE_WINDOW_S of audio each.
    per_point = max(1, round(TRACE_WINDOW_S / CHUNK_SECONDS))
    return {
        "pacing_drift_ms": round(value, 2),
        "pacing": {
            "job_audio_s": run.result.get("seconds_streamed"),
            "status": run.result.get("status"),
            "receiver_drift_ms": round(value, 2),
            "baseline_summed_sleeps_drift_ms": round(summed, 1),
            "ratio_drift_vs_summed_sleeps": ratio(abs(value), summed),
            "underruns": len((run.segment or {}).get("underruns", [])),
            "schedule_error_ms": spread(errors, 2),
            # The plot's trace, small enough for the JSON: the worst chunk of each second.
            "trace_window_s": round(per_point * CHUNK_SECONDS, 3),
            "schedule_error_ms_max_per_window": [
                max(errors[i : i + per_point]) for i in range(0, len(errors), per_point)
            ],
            "goal_drift_below_ms": 5.0,
        },
    }


def step(
    stack: LocalStack,
    procs: dict[str, psutil.Process],
    n: int,
    clip: Path,
    lead: float,
    timeout: float,
    tag: str,
) -> dict[str, Any]:
    """Play `n` jobs at once on `procs["worker"]`; the CPU and RSS of every process in `procs`
    (worker, LiveKit server, receivers) while (nearly) all of them play."""
    with ProcessSampler(procs) as sampler:
        rooms = [f"{tag}-{n}-{i}" for i in range(n)]
        runs = collect(stack, submit(rooms, clip, lead, per_second=STARTS_PER_S), timeout)
    done = _completed(runs)
    start, end = _playing_window([r.result["timestamps"] for r in done])
    figures: dict[str, Any] = {
        "streams": n,
        "completed": len(done),
        "window_s": round(end - start, 1),
    }
    for name in procs:
        cpu, rss, ffmpeg_rss = sampler.cpu_rss(name, start, end)
        figures[f"{name}_cpu_percent"] = cpu
        figures[f"{name}_rss_mb"] = rss
        if name == "worker":
            figures["ffmpeg_rss_mb"] = ffmpeg_rss
            figures["worker_threads_cpu_percent"] = sampler.thread_cpu(name, start, end)
    receivers = [figures[f"{name}_cpu_percent"] for name in procs if name.startswith("receiver_")]
    if receivers:
        # The front's figure includes its children: the busiest child says who saturates.
        figures["receiver_busiest_cpu_percent"] = max(receivers[1:], default=receivers[0])
    errors = [e for r in done for e in r.result.get("pacing_errors_ms") or []]
    figures["schedule_error_ms"] = spread(errors, 2)
    figures["underruns"] = sum(len(r.segment["underruns"]) for r in done if r.segment)
    figures["missing_segments"] = sum(r.segment is None for r in done)
    figures["sustained"] = (
        len(done) == n
        and figures["underruns"] == 0
        and figures["missing_segments"] == 0
        and figures["schedule_error_ms"]["p99"] < SCHEDULE_P99_GOAL_MS
    )
    figures["worker_cpu_percent_per_stream"] = round(figures["worker_cpu_percent"] / n, 2)
    figures["worker_rss_mb_per_stream"] = round(figures["worker_rss_mb"] / n, 2)
    return figures


def _playing_window(stamps: list[dict[str, Any]]) -> tuple[float, float]:
    """Epoch seconds while nearly every stream plays: from the moment 90 % had their first
    byte out to the moment 10 % had their last (100 joins at once take longer than a short
    clip, so "all at once" may never happen)."""
    firsts = [t["first_byte"] for t in stamps if t.get("first_byte")]
    lasts = [t["last_byte"] for t in stamps if t.get("last_byte")]
    start, end = pct(firsts, PLAYING_SHARE), pct(lasts, 1 - PLAYING_SHARE)
    if end <= start:  # starts so late that 90 % never played at once: half of them did
        start, end = pct(firsts, 0.5), pct(lasts, 0.5)
    return start, end


def pacing_p99(steps: list[dict[str, Any]], at: int) -> float:
    """p99 schedule error of the step closest to `at` streams."""
    if not steps:
        return 0.0
    nearest = min(steps, key=lambda s: abs(s["streams"] - at))
    return float(nearest["schedule_error_ms"]["p99"])
