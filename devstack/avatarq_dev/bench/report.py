"""The benchmark's outputs: the summary table (text and markdown) and the PNG plots."""

from __future__ import annotations

from pathlib import Path
from typing import Any

#: (label, dotted path of the value, of its baseline, unit, goal)
Row = tuple[str, str, str | None, str, str]

ROWS: list[Row] = [
    (
        "start overhead p50 (excl. avatar start)",
        "overhead.start_overhead_s.p50",
        "overhead.avatar_start_s.p50",
        "s",
        "< 1 s",
    ),
    ("start overhead p95", "overhead.start_overhead_s.p95", None, "s", "< 1 s"),
    (
        "start overhead p50, warm (kept room and avatar)",
        "warm_start_overhead_p50_s",
        "warm_start.cold_start_s.p50",
        "s",
        "< 0.1 s",
    ),
    (
        "warm start: picked → kept link (decoder, first chunk)",
        "warm_start.warm_picked_to_link_s.p50",
        None,
        "s",
        "",
    ),
    ("… of it: ffmpeg start to first chunk", "decode.job_start_p50.first_chunk_s", None, "s", ""),
    (
        "avatar start p50 (emulator, AvatarRunner order: asked for → listening)",
        "overhead.avatar_start_s.p50",
        None,
        "s",
        "reported",
    ),
    (
        "avatar start p50, light receiver (video at once)",
        "overhead_light_receiver.avatar_start_s.p50",
        "overhead.avatar_start_s.p50",
        "s",
        "reported",
    ),
    (
        "end overhead p50 (last byte → finished)",
        "overhead.end_overhead_s.p50",
        "overhead.lead_s",
        "s",
        "< lead + 0.3 s",
    ),
    ("end overhead p95", "overhead.end_overhead_s.p95", "overhead.lead_s", "s", "< lead + 0.3 s"),
    ("pickup latency at idle p50", "overhead.pickup_latency_s.p50", None, "s", ""),
    (
        "receiver drift, long job",
        "pacing.receiver_drift_ms",
        "pacing.baseline_summed_sleeps_drift_ms",
        "ms",
        "< 5 ms",
    ),
    ("schedule error p50, long job", "pacing.schedule_error_ms.p50", None, "ms", ""),
    ("schedule error p99, long job", "pacing.schedule_error_ms.p99", None, "ms", ""),
    ("schedule error max, long job", "pacing.schedule_error_ms.max", None, "ms", ""),
    (
        "schedule error p99, ramp step nearest 50 streams",
        "schedule_error_p99_ms",
        None,
        "ms",
        "< 20 ms",
    ),
    ("max streams in one process (no underrun)", "max_streams_per_process", None, "", "≥ 100"),
    (
        "worker CPU per stream (threads pool vs prefork, same streams)",
        "concurrency.worker_cpu_percent_per_stream",
        "concurrency.prefork_cpu_percent_per_stream",
        "% core",
        "",
    ),
    (
        "worker CPU per stream at the ramp's top step",
        "concurrency.worker_cpu_percent_per_stream_at_top",
        None,
        "% core",
        "",
    ),
    ("worker RSS per stream", "rss_per_stream_mb", "rss_per_stream_mb_prefork", "MB", "≥ 10× less"),
    (
        "decode+resample, slowest format",
        "decode_x_realtime",
        "decode.slowest_baseline_x_realtime",
        "× real time",
        "≥ 300×",
    ),
    (
        "enqueue, single",
        "queue.enqueue_single_jobs_per_s",
        "queue.baseline_celery_send_task_jobs_per_s",
        "jobs/s",
        "",
    ),
    (
        "enqueue, bulk",
        "queue.enqueue_bulk_jobs_per_s",
        "queue.baseline_celery_send_task_jobs_per_s",
        "jobs/s",
        "",
    ),
    (
        "avatar session slot taken when free (quota) vs a Redis PING",
        "quota.slot_take_p50_ms",
        "quota.redis_ping_p50_ms",
        "ms",
        "< 10 ms",
    ),
    (
        "sender CPU per paced stream vs unpaced floor",
        "cpu_per_stream_pct",
        "cpu_per_stream_unpaced_pct",
        "% core",
        "ratio ≤ 1.5",
    ),
    (
        "sender CPU per paced stream vs DataStreamAudioOutput",
        "cpu_per_stream_pct",
        "cpu_per_stream_agents_pct",
        "% core",
        "ratio ≤ 0.5",
    ),
    (
        "sender: SDK write p99 (FFI, native send, completion)",
        "sender.ours.write_ms.p99",
        "sender.ours.write_ms.p50",
        "ms",
        "",
    ),
    (
        "sender CPU per stream with a keeper room per stream (rooms that existed before)",
        "sender.ours_keepers.cpu_percent_per_stream",
        "sender.ours.cpu_percent_per_stream",
        "% core",
        "",
    ),
    (
        "sender CPU per stream with the SDK's own event delivery (every event to every room)",
        "sender.ours_sdk_delivery.cpu_percent_per_stream",
        "sender.ours.cpu_percent_per_stream",
        "% core",
        "",
    ),
    (
        "bytes the keepers received per audio byte sent",
        "sender.ours_keepers.keeper_bytes_per_audio_byte",
        None,
        "",
        "0 (expected)",
    ),
    (
        "sender CPU per stream, embedded server (comparison only)",
        "embedded_comparison.ours.cpu_percent_per_stream",
        "sender.ours.cpu_percent_per_stream",
        "% core",
        "",
    ),
    (
        "sender bytes/s unpaced, ours",
        "sender.ours_unpaced.bytes_per_s_per_stream",
        "sender.agents_unpaced.bytes_per_s_per_stream",
        "B/s",
        "",
    ),
    (
        "sender CPU per stream, SDK log capture on (SDK default)",
        "sender.logs.sdk_capture.cpu_percent_per_stream",
        "sender.ours.cpu_percent_per_stream",
        "% core",
        "",
    ),
    (
        "sender CPU per stream, verbose SDK logs",
        "sender.logs.verbose.cpu_percent_per_stream",
        "sender.ours.cpu_percent_per_stream",
        "% core",
        "",
    ),
    (
        "fleet burst drain / ideal (lanes; baseline: polling)",
        "fleet.lanes.burst.ratio_drain_vs_ideal",
        "fleet.polling.burst.ratio_drain_vs_ideal",
        "x",
        "≤ 1.25x",
    ),
    (
        "fleet burst drain / ideal, light receivers (avatars mostly off the shared cores; "
        "baseline: lanes on the emulator)",
        "fleet.light.burst.ratio_drain_vs_ideal",
        "fleet.lanes.burst.ratio_drain_vs_ideal",
        "x",
        "comparison",
    ),
    (
        "fleet burst drain time (lanes)",
        "fleet.lanes.burst.drain_s",
        "fleet.polling.burst.drain_s",
        "s",
        "",
    ),
    (
        "fleet burst: enqueue → first audio (lanes; baseline: polling)",
        "fleet.lanes.burst.first_audio_after_s",
        "fleet.polling.burst.first_audio_after_s",
        "s",
        "",
    ),
    (
        "fleet burst: cold avatar start p50, asked for → ready",
        "fleet.lanes.burst.cold_avatar_start_s.p50",
        "fleet.polling.burst.cold_avatar_start_s.p50",
        "s",
        "",
    ),
    (
        "fleet burst: audio / avatar session time",
        "fleet.lanes.burst.audio_share_of_session_time",
        "fleet.polling.burst.audio_share_of_session_time",
        "",
        "",
    ),
    (
        "fleet burst: all cores busy p50 while it drains (lanes; baseline: light receivers)",
        "fleet.lanes.burst.cpu.machine_busy_percent.p50",
        "fleet.light.burst.cpu.machine_busy_percent.p50",
        "% of all cores",
        "",
    ),
    (
        "fleet burst: share of its drain with all cores ≥ 90 % busy (baseline: light receivers)",
        "fleet.lanes.burst.cpu.machine_busy_percent.saturated_share",
        "fleet.light.burst.cpu.machine_busy_percent.saturated_share",
        "",
        "",
    ),
    (
        "fleet burst peak sessions (quota: fleet.*.burst.quota)",
        "fleet.lanes.burst.peak_sessions",
        "fleet.lanes.burst.quota",
        "",
        "≤ quota",
    ),
    (
        "skew: free rooms' enqueue → end p95 (lanes; baseline: polling)",
        "fleet.lanes.skew.free_room_enqueue_to_end_s.p95",
        "fleet.polling.skew.free_room_enqueue_to_end_s.p95",
        "s",
        "within seconds",
    ),
    (
        "back to back: silence between jobs p50 (baseline: polling)",
        "fleet.lanes.back_to_back.gap_s.p50",
        "fleet.polling.back_to_back.gap_s.p50",
        "s",
        "< 0.3 s",
    ),
    (
        "back to back: silence between jobs p95",
        "fleet.lanes.back_to_back.gap_s.p95",
        "fleet.polling.back_to_back.gap_s.p95",
        "s",
        "",
    ),
    (
        "back to back: warm start p50 (baseline: polling)",
        "fleet.lanes.back_to_back.warm_start_s.p50",
        "fleet.polling.back_to_back.warm_start_s.p50",
        "s",
        "< 0.1 s",
    ),
    (
        "recording: CPU a recorded job adds (share of a core)",
        "recording.core_share_per_recording_job",
        None,
        "core",
        "",
    ),
    (
        "recording: a recorder's RSS, with its ffmpeg",
        "recording.recorder_rss_mb_per_job",
        None,
        "MB",
        "",
    ),
    (
        "recording: schedule p99 of 10 plain streams beside 2 recorded (baseline: 12 plain)",
        "recording.plain_p99_ms_beside_recordings",
        "recording.plain_p99_ms_all_plain",
        "ms",
        "< 20 ms",
    ),
]


def lookup(results: dict[str, Any], path: str) -> Any:
    node: Any = results
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.3g}" if abs(value) < 100 else f"{value:,.0f}"
    return "—" if value is None else str(value)


def rows(results: dict[str, Any]) -> list[list[str]]:
    """[figure, value, baseline, ratio, goal] for every figure the run measured."""
    out = []
    for label, path, base_path, unit, goal in ROWS:
        value = lookup(results, path)
        if value is None:
            continue
        base = lookup(results, base_path) if base_path else None
        ratio = value / base if isinstance(value, int | float) and base else None
        shown = f"{_fmt(value)} {unit}".strip()
        out.append([label, shown, _fmt(base), f"{ratio:.2f}" if ratio is not None else "—", goal])
    for size in lookup(results, "sender.chunks") or []:
        if "error" in size:
            continue
        cpu, p99 = size["cpu_percent_per_stream"], size["schedule_error_ms"]["p99"]
        out.append(
            [
                f"chunk {size['chunk_s']:g} s: CPU per stream / schedule p99",
                f"{cpu:.2f} % / {p99:.1f} ms",
                "—",
                "—",
                "",
            ]
        )
    return out


HEADER = ["figure", "value", "baseline", "ratio", "goal"]
STEP_HEADER = [
    "streams",
    "worker CPU",
    "LiveKit server CPU",
    "receivers CPU (busiest of them)",
    "worker RSS",
    "schedule p99",
    "underruns",
    "sustained",
]


def step_rows(results: dict[str, Any]) -> list[list[str]]:
    """One row per ramp step (and the prefork baseline): who uses how much CPU (% of one
    core), so the table shows what saturates first."""
    steps = list(lookup(results, "concurrency.steps") or [])
    prefork = lookup(results, "concurrency.prefork")
    out = []
    for step in [*steps, *([prefork] if prefork else [])]:
        label = str(step["streams"]) + (" (prefork)" if step is prefork else "")
        out.append(
            [
                label,
                f"{step['worker_cpu_percent']:.0f} %",
                f"{step['livekit_server_cpu_percent']:.0f} %",
                f"{step.get('receiver_front_cpu_percent', 0):.0f} % "
                f"({step.get('receiver_busiest_cpu_percent', 0):.0f} %)",
                f"{step['worker_rss_mb']:.0f} MB",
                f"{step['schedule_error_ms']['p99']:.1f} ms",
                str(step["underruns"]),
                "yes" if step["sustained"] else "no",
            ]
        )
    return out


def text_table(results: dict[str, Any]) -> str:
    body = rows(results)
    widths = [max(len(r[i]) for r in [HEADER, *body]) for i in range(len(HEADER))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)) for r in [HEADER, *body]
    )


def _markdown(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(lines)


def markdown_table(results: dict[str, Any]) -> str:
    return _markdown(HEADER, rows(results))


def markdown_steps(results: dict[str, Any]) -> str:
    """The ramp's per-process CPU table ("" when the run had no ramp)."""
    body = step_rows(results)
    return _markdown(STEP_HEADER, body) if body else ""


def plot(results: dict[str, Any], out_dir: Path) -> list[Path]:
    """docs/bench-pacing.png (schedule error over the long job) and docs/bench-concurrency.png
    (CPU and RSS against streams)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    trace = lookup(results, "pacing.schedule_error_ms_max_per_window") or []
    window = lookup(results, "pacing.trace_window_s") or 1.0
    if trace:
        fig, ax = plt.subplots(figsize=(8, 3.5))
        ax.plot([i * window / 60 for i in range(len(trace))], trace, lw=0.6)
        ax.set_xlabel("audio time (min)")
        ax.set_ylabel("schedule error (ms)")
        ax.set_title(f"Sender schedule error of the long job (worst write of each {window:g} s)")
        fig.tight_layout()
        written.append(out_dir / "bench-pacing.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    steps = lookup(results, "concurrency.steps") or []
    if steps:
        n = [s["streams"] for s in steps]
        fig, (cpu, rss) = plt.subplots(1, 2, figsize=(10, 3.8))
        for key, label in (
            ("worker_cpu_percent", "worker (one process)"),
            ("livekit_server_cpu_percent", f"LiveKit server ({results.get('server')})"),
            ("receiver_front_cpu_percent", "light receivers (all processes)"),
            ("receiver_busiest_cpu_percent", "busiest receiver process"),
        ):
            cpu.plot(n, [s.get(key, 0.0) for s in steps], marker="o", label=label)
        cpu.set_xlabel("concurrent streams")
        cpu.set_ylabel("CPU (% of one core)")
        cpu.legend(fontsize=8)
        rss.plot(n, [s["worker_rss_mb"] for s in steps], marker="o", label="worker (threads)")
        prefork = lookup(results, "concurrency.prefork")
        if prefork:
            rss.plot([prefork["streams"]], [prefork["worker_rss_mb"]], "rs", label="prefork total")
        rss.set_xlabel("concurrent streams")
        rss.set_ylabel("RSS (MB)")
        rss.legend(fontsize=8)
        fig.tight_layout()
        written.append(out_dir / "bench-concurrency.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    return written
