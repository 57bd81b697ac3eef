"""`avatarq bench`: overhead, pacing, concurrency, decode, queue and sender cost, each against
a baseline measured in the same run on the same machine.

Sections that join rooms run inside infra/netns-run on the local stack's LiveKit server; every
loop is bounded in count and time. What each section measures, and the latest figures:
docs/performance.md."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil
from livekit import rtc

from avatarq.settings import get_settings
from avatarq_dev import livekit_official
from avatarq_dev.bench import codec, queue, report, scale, streams
from avatarq_dev.bench.fleet import FULL_FLEET, QUICK_FLEET, FleetPlan, bench_fleet
from avatarq_dev.bench.load import LightAvatars, light_avatars
from avatarq_dev.bench.quota import bench_quota
from avatarq_dev.bench.recording import bench_recording
from avatarq_dev.bench.stats import make_clip, ratio
from avatarq_dev.processes import ManagedProcess
from avatarq_dev.stack import LocalStack, local_stack
from tasks.toolkit import CHUNK_SECONDS

SECTIONS = ("decode", "queue", "jobs", "sender", "fleet", "recording")
NETNS_SECTIONS = {"jobs", "sender", "fleet", "recording"}


@dataclass(frozen=True)
class Plan:
    name: str
    decode_seconds: float
    queue_jobs: int
    overhead_jobs: int
    overhead_batch: int
    overhead_audio_s: float
    drift_audio_s: float
    ramp: tuple[int, ...]
    ramp_audio_s: float
    prefork_streams: int
    sender_streams: int
    sender_seconds: float
    chunks: tuple[float, ...]
    budget_s: float  # the ramp stops early rather than run past this
    fleet: FleetPlan = FULL_FLEET
    #: The sender's cost with the SDK's log capture / verbose logs, and the FFI routing run.
    experiments: bool = True
    #: Each job's audio in the recording section.
    recording_audio_s: float = 30.0


QUICK = Plan(
    name="quick",
    decode_seconds=60,
    queue_jobs=200,
    # Three at a time, as the full plan: five concurrent cold starts on 2 cores measured the
    # contention more than the start (docs/performance.md, "The fleet in the morning"). As
    # many as the full plan too: the median of 12 moved by a fifth from run to run.
    overhead_jobs=24,
    overhead_batch=3,
    overhead_audio_s=1.0,
    drift_audio_s=20,
    ramp=(10, 25, 50),
    ramp_audio_s=20,
    prefork_streams=10,
    sender_streams=4,
    sender_seconds=4,
    chunks=(0.1,),
    budget_s=220,
    fleet=QUICK_FLEET,
    experiments=False,
    recording_audio_s=15.0,
)
FULL = Plan(
    name="full",
    decode_seconds=60,
    queue_jobs=1000,
    overhead_jobs=24,
    overhead_batch=3,
    overhead_audio_s=2.0,
    drift_audio_s=600,
    ramp=(10, 25, 50, 75, 100),
    ramp_audio_s=40,
    prefork_streams=25,
    sender_streams=20,
    sender_seconds=10,
    chunks=(0.1, 0.2, 0.25, 0.4),
    budget_s=840,
)
LEAD = 0.5
#: Rounds of warm starts in the overhead section's last rooms (one job per room each).
WARM_ROUNDS = 8
#: A round's jobs arrive this many per second, as a room's next announcement does: three
#: sent in the same instant time three ffmpeg starts colliding on 2 cores, not a warm start
#: (docs/performance.md, "The fleet in the afternoon").
WARM_STARTS_PER_S = 5.0
#: The pacing goal (p99 schedule error) is stated at this many concurrent jobs.
PACING_GOAL_STREAMS = 50
#: Workers on the bench stack: every result carries its pacing trace, and the avatar servers'
#: fleet-wide session quota (default 10, a license's) is lifted: the emulator and the light
#: receivers stand in for a fleet without one, and the ramp must be what plays at once.
BENCH_ENV = {"AVATARQ_PACING_TRACE": "true", "AVATARQ_AVATAR_MAX_SESSIONS": "1000"}


def machine() -> dict[str, Any]:
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    return {
        "cores": psutil.cpu_count(),
        "ram_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "cpu": model,
        "python": platform.python_version(),
        # The worker's and sender's SDK (the avatar emulator's may differ: docs/compatibility.md).
        "livekit_rtc": rtc.__version__,
        "load_avg_start": [round(x, 2) for x in os.getloadavg()],
    }


class JobsBench:
    """Sections 1–3 on one local stack: overhead and drift against the avatar emulator (an
    AvatarRunner's start), the ramp and the prefork baseline against the light receivers."""

    def __init__(self, stack: LocalStack, light: LightAvatars, plan: Plan, deadline: float) -> None:
        self.stack, self.light, self.plan, self.deadline = stack, light, plan, deadline
        self.clip = make_clip(stack.workdir / "overhead.wav", plan.overhead_audio_s, rate=16000)
        self.ramp_clip = make_clip(stack.workdir / "ramp.wav", plan.ramp_audio_s, rate=16000)
        self.stopped_by = "end of ramp"

    def run(self) -> dict[str, Any]:
        plan, stack = self.plan, self.stack
        # The long job first, on a worker of its own (concurrency 1): the other sections load
        # the machine while it plays, which is what drift must survive. It has a broker
        # database of its own: idle once its job ended, it would take the ramp's jobs from the
        # shared queue and play them against the emulator.
        broker = stack.redis.db_url(1)
        drift_worker = stack.start_worker(
            "drift", concurrency=1, extra_env={**BENCH_ENV, "CELERY_BROKER_URL": broker}
        )
        long_clip = make_clip(stack.workdir / "long.wav", plan.drift_audio_s, rate=16000)
        drift_settings = get_settings().model_copy(update={"celery_broker_url": broker})
        drift_job = streams.submit(["bench-drift"], long_clip, LEAD, settings=drift_settings)
        self._wait_playing(drift_job[0][0].job_id)
        results = self._overhead()

        worker = stack.start_worker(
            "ramp", concurrency=max(plan.ramp), extra_env={**BENCH_ENV, **self.light.env()}
        )
        procs = self._procs(worker)
        idle_rss = procs["worker"].memory_info().rss / 1e6
        # The same start against the light receiver (video at once, receiver ready): the
        # difference is the AvatarRunner's audio → subscription → video order.
        light_rooms = [f"bench-light-{i}" for i in range(plan.overhead_batch)]
        light_runs = streams.collect(stack, streams.submit(light_rooms, self.clip, LEAD), 60)
        light = streams.overhead(light_runs, LEAD)["overhead"]
        results["overhead_light_receiver"] = {
            key: light[key] for key in ("completed", "avatar_start_s", "start_overhead_s")
        }
        steps: list[dict[str, Any]] = []
        for n in plan.ramp:
            if time.monotonic() + plan.ramp_audio_s + 30 > self.deadline:
                self.stopped_by = "time budget"
                break
            steps.append(
                streams.step(stack, procs, n, self.ramp_clip, LEAD, plan.ramp_audio_s + 90, "ramp")
            )
            # Underruns end the ramp only past the pacing goal's 50 streams, which must be
            # measured either way; failed jobs end it at once.
            if steps[-1]["completed"] < n:
                self.stopped_by = "failed jobs"
                break
            if not steps[-1]["sustained"] and n >= PACING_GOAL_STREAMS:
                self.stopped_by = "underruns or schedule error"
                break
        worker.stop()
        prefork = self._prefork()
        results.update(self._concurrency(steps, prefork, idle_rss))

        drift_runs = streams.collect(stack, drift_job, plan.drift_audio_s + 90)
        # Left running, it would take later sections' jobs from the shared queue, with its
        # own settings (the fleet's quota among them).
        drift_worker.stop()
        results.update(streams.drift(drift_runs[0]))
        return results

    def _overhead(self) -> dict[str, Any]:
        """Cold starts in batches, then warm ones in the last batch's rooms, on the emulator:
        its AvatarRunner start (audio, subscription, video) is what the keeper, the audio
        subscription and the receiver probe add to."""
        plan, stack = self.plan, self.stack
        worker = stack.start_worker("bench", concurrency=plan.overhead_batch, extra_env=BENCH_ENV)
        runs: list[streams.Played] = []
        rooms: list[str] = []
        for start in range(0, plan.overhead_jobs, plan.overhead_batch):
            rooms = [
                f"bench-oh-{i}"
                for i in range(start, min(start + plan.overhead_batch, plan.overhead_jobs))
            ]
            runs += streams.collect(stack, streams.submit(rooms, self.clip, LEAD), 60)
        results = streams.overhead(runs, LEAD)
        # The last batch's rooms still hold their avatars (AVATARQ_WARM_IDLE): play there again,
        # several rounds, so that the warm median is not one moment's.
        cold = runs[-len(rooms) :]
        warm: list[streams.Played] = []
        for _ in range(WARM_ROUNDS):
            jobs = streams.submit(rooms, self.clip, LEAD, per_second=WARM_STARTS_PER_S)
            warm += streams.collect(stack, jobs, 60)
        results.update(streams.warm_start(cold, warm))
        worker.stop()
        return results

    def _procs(self, worker: ManagedProcess) -> dict[str, psutil.Process]:
        assert worker.proc is not None and self.stack.livekit.proc is not None
        return {
            "worker": psutil.Process(worker.proc.pid),
            "livekit_server": psutil.Process(self.stack.livekit.proc.pid),
            **self.light.processes(),
        }

    def _wait_playing(self, job_id: str) -> None:
        from producers import get_status

        limit = time.monotonic() + 60
        while time.monotonic() < limit and get_status(job_id).get("status") != "playing":
            time.sleep(0.2)

    def _prefork(self) -> dict[str, Any]:
        n = self.plan.prefork_streams
        # One process per job, each with its own loop and LiveKit runtime: the obvious design.
        worker = self.stack.start_worker(
            "prefork",
            concurrency=n,
            # "processes" is Celery's other name for prefork: `-P prefork` is taken as "the
            # default pool" and replaced by the configured threads pool.
            pool="processes",
            extra_env={**BENCH_ENV, **self.light.env(), "AVATARQ_METRICS_PORT": "0"},
        )
        try:
            return streams.step(
                self.stack,
                self._procs(worker),
                n,
                self.ramp_clip,
                LEAD,
                self.plan.ramp_audio_s + 90,
                "prefork",
            )
        finally:
            worker.stop()

    def _concurrency(
        self, steps: list[dict[str, Any]], prefork: dict[str, Any], idle_rss: float
    ) -> dict[str, Any]:
        # Every step up to it sustained: one lucky step above a failed one is noise.
        unsustained = [s["streams"] for s in steps if not s["sustained"]]
        sustained = [s["streams"] for s in steps if s["streams"] < min(unsustained, default=1e9)]
        same = next((s for s in steps if s["streams"] == prefork["streams"]), None)
        basis = next((s for s in reversed(steps) if s["streams"] in sustained), None) or (
            steps[0] if steps else None
        )
        # The largest step whose CPU window held samples (a step that fell apart may not).
        top = next((s for s in reversed(steps) if s["worker_cpu_percent"] > 0), None)
        near_50 = (
            min(steps, key=lambda s: abs(s["streams"] - PACING_GOAL_STREAMS)) if steps else None
        )
        threads_rss = same["worker_rss_mb_per_stream"] if same else 0.0
        prefork_rss = prefork["worker_rss_mb_per_stream"]
        return {
            "max_streams_per_process": max(sustained, default=0),
            "schedule_error_p99_ms": near_50["schedule_error_ms"]["p99"] if near_50 else 0.0,
            "rss_per_stream_mb": threads_rss,
            "rss_per_stream_mb_prefork": prefork_rss,
            "concurrency": {
                "audio_s_per_job": self.plan.ramp_audio_s,
                "source_format": "wav (decode cost: see decode)",
                "worker_rss_mb_idle": round(idle_rss, 1),
                "schedule_error_at_streams": near_50["streams"] if near_50 else None,
                "compared_at_streams": prefork["streams"],
                "worker_cpu_percent_per_stream": same["worker_cpu_percent_per_stream"]
                if same
                else None,
                "prefork_cpu_percent_per_stream": prefork["worker_cpu_percent_per_stream"],
                "ratio_rss_per_stream_prefork_vs_threads": ratio(prefork_rss, threads_rss),
                "worker_rss_mb_per_stream_marginal_at_top": round(
                    (top["worker_rss_mb"] - idle_rss) / top["streams"], 2
                )
                if top
                else None,
                "worker_cpu_percent_per_stream_at_top": top["worker_cpu_percent_per_stream"]
                if top
                else None,
                "top_streams": top["streams"] if top else None,
                "receiver_processes": len(self.light.processes()) - 1,
                "stopped_by": self.stopped_by,
                "steps": steps,
                # From the largest sustained step (else the first): a healthy worker's cost.
                "scale": scale.node_plan(basis, idle_rss) if basis else None,
                "prefork": prefork,
            },
        }


def bench_sender(
    stack: LocalStack, light: LightAvatars, plan: Plan, *, full: bool = True
) -> dict[str, Any]:
    """Sections 6–8, each configuration in a fresh process (see sender.py),
    against the light receivers. `full=False`: only our paced sender (a comparison row)."""
    base_env = {k: v for k, v in os.environ.items() if k not in ("RUST_LOG", "LIVEKIT_RTC_DEBUG")}

    def run(
        *args: str, env: dict[str, str] | None = None, streams_: int | None = None
    ) -> dict[str, Any]:
        argv = [
            sys.executable,
            "-m",
            "avatarq_dev.bench.sender",
            "--streams",
            str(streams_ or plan.sender_streams),
        ]
        argv += ["--seconds", str(plan.sender_seconds), *args]
        done = subprocess.run(
            argv,
            env={**base_env, **stack.env(), **light.env(), **(env or {})},
            capture_output=True,
            text=True,
            timeout=plan.sender_seconds * 3 + 150,
        )
        if done.returncode != 0:
            # One configuration failing must not cost the rest of the run its figures.
            return {"error": done.stderr.strip().splitlines()[-1:], "args": list(args)}
        return dict(json.loads(done.stdout.strip().splitlines()[-1]))

    huge_lead = str(plan.sender_seconds * 10)  # nothing waits: as fast as the avatar accepts
    ours = run("--mode", "ours")
    if not full:
        return {"ours": ours}
    results: dict[str, Any] = {
        "ours": ours,
        "agents": run("--mode", "agents"),
        # The floor: the same sender and streams moving the bytes as fast as they go.
        "ours_unpaced": run("--mode", "ours", "--lead", huge_lead),
        "agents_unpaced": run("--mode", "agents", "--lead", huge_lead),
        # What a keeper (AvatarLink.cover: only where the room closes before the job could end)
        # adds: a second room per stream, which the server sends a copy of the audio.
        "ours_keepers": run("--mode", "ours", "--keepers"),
        "chunks": [
            ours if chunk == CHUNK_SECONDS else run("--mode", "ours", "--chunk", str(chunk))
            for chunk in plan.chunks
        ],
    }
    if plan.experiments:
        # The same sender with the SDK's own event delivery (every event to every room).
        results["ours_sdk_delivery"] = run("--mode", "ours", "--sdk-event-delivery")
        results["logs"] = {
            "default": ours,
            "sdk_capture": run("--mode", "ours", env={"AVATARQ_LIVEKIT_LOG_CAPTURE": "1"}),
            "verbose": run(
                "--mode",
                "ours",
                "--verbose-logs",
                env={"AVATARQ_LIVEKIT_LOG_CAPTURE": "1", "LIVEKIT_RTC_DEBUG": "1"},
            ),
        }
    paced = ours.get("cpu_percent_per_stream", 0.0)
    unpaced = results["ours_unpaced"].get("cpu_percent_per_stream", 0.0)
    agents = results["agents"].get("cpu_percent_per_stream", 0.0)
    results["ratio_cpu_ours_vs_agents"] = ratio(paced, agents)
    results["ratio_cpu_paced_vs_unpaced"] = ratio(paced, unpaced)
    results["goal_ratio_paced_vs_unpaced_max"] = 1.5
    results["goal_ratio_ours_vs_agents_max"] = 0.5
    return results


def sender_keys(sender: dict[str, Any]) -> dict[str, Any]:
    """The top-level CPU figures: share of one core per real-time stream, paced (ours), the
    unpaced floor of the same sender, and livekit-agents' DataStreamAudioOutput paced alike."""
    return {
        "cpu_per_stream_pct": sender["ours"].get("cpu_percent_per_stream"),
        "cpu_per_stream_unpaced_pct": sender["ours_unpaced"].get("cpu_percent_per_stream"),
        "cpu_per_stream_agents_pct": sender["agents"].get("cpu_percent_per_stream"),
    }


def bench_embedded(plan: Plan, workdir: Path) -> dict[str, Any]:
    """The comparison row: our paced sender on the embedded (Python) LiveKit server."""
    with (
        queue.settings_env({livekit_official.CHOICE_ENV: "embedded"}),
        local_stack(workdir) as stack,
        light_avatars(stack) as light,
    ):
        return {"server": stack.server, **bench_sender(stack, light, plan, full=False)}


def run(
    plan: Plan, sections: tuple[str, ...] = SECTIONS, workdir: Path | None = None
) -> dict[str, Any]:
    """Run `sections` of `plan`; one JSON-able dict."""
    started = time.monotonic()
    deadline = started + plan.budget_s
    workdir = workdir or Path(tempfile.mkdtemp(prefix="avatarq-bench-"))
    results: dict[str, Any] = {
        "plan": plan.name,
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "sections": list(sections),
    }
    if plan is QUICK:
        results["note"] = (
            f"--quick: drift from a {plan.drift_audio_s:g}-second job, not 10 minutes; "
            f"concurrency only up to {max(plan.ramp)} streams"
        )
    if "decode" in sections:
        results.update(codec.bench_decode(workdir, plan.decode_seconds))
    if "queue" in sections:
        clip = make_clip(workdir / "queue.wav", 1.0, rate=16000)
        results.update(queue.bench_queue(workdir, clip, plan.queue_jobs, time_limit=30))
        results.update(bench_quota(workdir, rounds=plan.queue_jobs, time_limit=20))
    if NETNS_SECTIONS & set(sections):
        if os.environ.get("AVATARQ_IN_NETNS") != "1":
            raise SystemExit(
                "sections jobs/sender/fleet/recording join LiveKit rooms: run inside "
                "infra/netns-run"
            )
        with (
            local_stack(workdir / "stack") as stack,
            queue.settings_env(stack.env()),
            light_avatars(stack) as light,
        ):
            results["server"] = stack.server
            if "sender" in sections:
                results["sender"] = bench_sender(stack, light, plan)
                results.update(sender_keys(results["sender"]))
            if "jobs" in sections:
                results.update(JobsBench(stack, light, plan, deadline).run())
            if "fleet" in sections:
                results.update(bench_fleet(stack, plan.fleet, light))
            if "recording" in sections:
                goal, audio_s = streams.SCHEDULE_P99_GOAL_MS, plan.recording_audio_s
                results.update(bench_recording(stack, BENCH_ENV, audio_s, LEAD, goal))
        if "sender" in sections and results["server"] != "embedded":
            results["embedded_comparison"] = bench_embedded(plan, workdir / "embedded")
    results["machine"]["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
    results["elapsed_s"] = round(time.monotonic() - started, 1)
    return results


#: Generated text sits between these markers; hand-written text around them is kept.
BEGIN, END = "<!-- avatarq bench: begin -->", "<!-- avatarq bench: end -->"


def _splice(path: Path, block: str) -> None:
    text = path.read_text() if path.exists() else f"# Performance\n\n{BEGIN}\n{END}\n"
    head, begin, rest = text.partition(BEGIN)
    _, end, tail = rest.partition(END)
    if not (begin and end):
        raise SystemExit(f"{path}: no {BEGIN} … {END} block to replace")
    path.write_text(f"{head}{BEGIN}\n{block}\n{END}{tail}")


def write_docs(results: dict[str, Any], docs: Path) -> list[Path]:
    """The PNG plots and the generated part of docs/performance.md (table, date, machine,
    all figures); also of the README next to `docs` when it has the markers."""
    docs.mkdir(parents=True, exist_ok=True)
    plots = report.plot(results, docs)
    m = results["machine"]
    summary = (
        f"`avatarq bench` ({results['plan']} plan, {results['elapsed_s']:.0f} s), "
        f"{results['date']}, on {m['cores']} cores ({m['cpu']}) and {m['ram_gb']} GB RAM; load "
        f"average {m['load_avg_start']} at the start, {m['load_avg_end']} at the end (shared "
        f"machine). livekit-rtc {m.get('livekit_rtc', '?')}. LiveKit server: "
        f"{results.get('server', '?')}; it, the avatar emulator and the "
        "light receivers share the worker's cores."
    )
    table = report.markdown_table(results)
    steps = report.markdown_steps(results)
    if steps:
        table += f"\n\nPer ramp step, CPU in % of one core while (nearly) all play:\n\n{steps}"
    plan_16 = report.lookup(results, "concurrency.scale")
    if plan_16:
        table += (
            f"\n\nA {scale.NODE_CORES}-core, {scale.NODE_RAM_GB} GB worker node, from the "
            f"{plan_16['from_step_streams']}-stream step (each limit at "
            f"{scale.HEADROOM:.0%}):\n\n{scale.markdown(plan_16)}"
        )
    figures = json.dumps(results, indent=1)
    _splice(
        docs / "performance.md",
        "\n\n".join(
            [
                summary,
                table,
                *(f"![{p.stem}]({p.name})" for p in plots),
                f"All figures (`avatarq bench --json`):\n\n```json\n{figures}\n```",
            ]
        ),
    )
    written = [docs / "performance.md", *plots]
    readme = docs.parent / "README.md"
    if readme.exists() and BEGIN in readme.read_text():
        links = [f"![{p.stem}]({docs.name}/{p.name})" for p in plots]
        _splice(readme, "\n\n".join([summary, table, *links]))
        written.append(readme)
    return written


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small counts, under 5 minutes")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated")
    parser.add_argument("--docs", type=Path, help="write performance.md and plots here")
    args = parser.parse_args(argv)
    return emit(
        QUICK if args.quick else FULL, tuple(args.sections.split(",")), args.json, args.docs
    )


def emit(plan: Plan, sections: tuple[str, ...], as_json: bool, docs: Path | None) -> int:
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        print(f"unknown sections: {', '.join(sorted(unknown))}", file=sys.stderr)
        return 2
    results = run(plan, sections)
    if docs is not None:
        write_docs(results, docs)
    print(json.dumps(results) if as_json else report.text_table(results))
    return 0
