"""The fleet section: what a burst of announcements costs the whole fleet, with room lanes and
with the design before them (`AVATARQ_ROOM_LANES=false`) as the comparison row, in one run.

Three loads against the avatar emulator: a burst over many rooms (drain time against the
ideal, peak sessions), a skew (how long free rooms wait behind a busy one) and back to back
jobs in one room (the silence between them, the warm start). Figures: docs/performance.md."""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import redis
import requests

from avatarq.ledger.keys import avatar_quota_key
from avatarq_dev.bench.load import LightAvatars
from avatarq_dev.bench.stats import ProcessSampler, make_clip, ratio, spread
from avatarq_dev.bench.streams import Played, collect
from avatarq_dev.faults.fleet import peak_sessions
from avatarq_dev.processes import ManagedProcess
from avatarq_dev.stack import LocalStack

LEAD = 0.3
#: How long a part waits for the fleet to be at rest: no session slot held, no quota shrunk
#: by a 429 (an earlier section's workers leave slots that lapse after 15 s; a cap lasts
#: its TTL).
REST_WAIT_S = 60.0
#: Bursts per design: one burst's drain moves by up to 0.3 s from the next on 2 shared cores
#: (its first wave's joins and avatar starts contend), so the section reports the median's.
BURST_ROUNDS = 3


@dataclass(frozen=True)
class FleetPlan:
    rooms: int
    per_room: int
    clip_s: float
    quota: int
    workers: int
    skew_busy_jobs: int
    skew_free_rooms: int
    b2b_jobs: int
    b2b_clip_s: float


QUICK_FLEET = FleetPlan(
    rooms=8, per_room=4, clip_s=1.0, quota=4, workers=2,
    skew_busy_jobs=15, skew_free_rooms=5, b2b_jobs=6, b2b_clip_s=2.0,
)  # fmt: skip
FULL_FLEET = FleetPlan(
    rooms=20, per_room=5, clip_s=1.0, quota=10, workers=2,
    skew_busy_jobs=30, skew_free_rooms=10, b2b_jobs=15, b2b_clip_s=2.0,
)  # fmt: skip


def _enqueue(room: str, clip: Path) -> tuple[Any, float]:
    from producers import enqueue

    at = time.time()
    return enqueue({"room": room, "avatar_id": "anna", "source": str(clip), "lead": LEAD}), at


def _sessions(stack: LocalStack, rooms: set[str]) -> list[dict[str, Any]]:
    import json

    out = []
    for path in stack.recordings.glob("*.json"):
        try:
            session = json.loads(path.read_text())
        except ValueError:
            continue  # being written
        if session.get("room") in rooms:
            out.append(session)
    return out


def _segments(sessions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    segs = [seg for s in sessions for seg in s.get("segments", []) if seg.get("first_frame_at")]
    return sorted(segs, key=lambda seg: seg["first_frame_at"])


class FleetBench:
    """Each part on fresh workers of one design (lanes on or off). `light`: the workers' avatars
    are the light receivers' instead of the emulator's."""

    def __init__(
        self, stack: LocalStack, plan: FleetPlan, lanes: bool, light: LightAvatars | None = None
    ) -> None:
        self.stack, self.plan, self.lanes = stack, plan, lanes
        self.clip = make_clip(stack.workdir / "fleet.wav", plan.clip_s, rate=16000)
        self.b2b_clip = make_clip(stack.workdir / "fleet-b2b.wav", plan.b2b_clip_s, rate=16000)
        self.tag = "light" if light else "lanes" if lanes else "polling"
        self.avatars = light.env() if light else {}
        #: Whose CPU is the avatars': the light receivers (their front with its children) or
        #: the emulator.
        self.avatar_process = light.proc if light else stack.avatar
        #: Seconds each part waited for the fleet to be at rest before it began.
        self.rest_waits: list[float] = []

    def _workers(self, quota: int) -> list[ManagedProcess]:
        self.rest_waits.append(_wait_for_rest(self.stack))
        env = {
            "AVATARQ_AVATAR_MAX_SESSIONS": str(quota),
            "AVATARQ_ROOM_LANES": "true" if self.lanes else "false",
            **self.avatars,
        }
        return [
            self.stack.start_worker(f"fleet-{self.tag}-{i}", concurrency=None, extra_env=env)
            for i in range(self.plan.workers)
        ]

    def _stop(self, workers: list[ManagedProcess]) -> None:
        for w in workers:
            w.stop()

    def run(self) -> dict[str, Any]:
        parts = {"burst": self.burst(), "skew": self.skew(), "back_to_back": self.back_to_back()}
        return {**parts, "waited_for_rest_s": self.rest_waits}

    def burst(self) -> dict[str, Any]:
        return bursts_summary([self._burst_once() for _ in range(BURST_ROUNDS)])

    def _burst_once(self) -> dict[str, Any]:
        p = self.plan
        rooms = [f"burst-{self.tag}-{secrets.token_hex(3)}" for _ in range(p.rooms)]
        workers = self._workers(p.quota)
        try:
            with ProcessSampler(self._processes(workers), 0.5, per_thread=False) as sampler:
                began = time.time()
                handles = [_enqueue(room, self.clip) for _ in range(p.per_room) for room in rooms]
                timeout = 60 + 3 * len(handles) * p.clip_s
                runs = collect(self.stack, handles, timeout)
            ended = [r.result.get("timestamps", {}).get("playback_finished") for r in runs]
            drain = max((t for t in ended if t), default=time.time()) - began
        finally:
            self._stop(workers)
        sessions = _sessions(self.stack, set(rooms))
        ideal = max(p.per_room * p.clip_s, len(handles) * p.clip_s / p.quota)
        completed = [r for r in runs if r.result.get("status") == "completed"]
        return {
            **_where_the_time_went(completed, sessions, began, drain, p.quota),
            "jobs": len(handles),
            "rooms": p.rooms,
            "quota": p.quota,
            "workers": p.workers,
            "completed": len(completed),
            "drain_s": round(drain, 2),
            "ideal_s": round(ideal, 2),
            "ratio_drain_vs_ideal": ratio(drain, ideal),
            "peak_sessions": peak_sessions(sessions, until=time.time()),
            "retried_jobs": sum(1 for r in completed if r.result.get("attempt", 1) > 1),
            "order_exact": _order_exact(runs, rooms),
            "goal_ratio_below": 1.25,
            "cpu": _cpu(sampler, began, began + drain),
        }

    def _processes(self, workers: list[ManagedProcess]) -> dict[str, psutil.Process]:
        """The processes a burst keeps busy, each with its descendants."""
        procs = {"livekit": self.stack.livekit, "avatars": self.avatar_process}
        procs.update({f"worker_{i}": w for i, w in enumerate(workers)})
        pids = {name: proc.proc.pid for name, proc in procs.items() if proc.proc is not None}
        stopped = sorted(procs.keys() - pids.keys())
        assert not stopped, f"the burst's processes {stopped} are not running"
        return {name: psutil.Process(pid) for name, pid in pids.items()}

    def skew(self) -> dict[str, Any]:
        p = self.plan
        busy = f"skew-busy-{self.tag}-{secrets.token_hex(3)}"
        free = [f"skew-free-{self.tag}-{secrets.token_hex(3)}" for _ in range(p.skew_free_rooms)]
        workers = self._workers(p.quota)
        try:
            busy_handles = [_enqueue(busy, self.clip) for _ in range(p.skew_busy_jobs)]
            free_handles = [_enqueue(room, self.clip) for room in free]
            free_runs = collect(self.stack, free_handles, 120)
            collect(self.stack, busy_handles, 60 + 3 * p.skew_busy_jobs * p.clip_s)
        finally:
            self._stop(workers)
        waits = [
            r.result["timestamps"]["playback_finished"] - r.enqueued_at
            for r in free_runs
            if r.result.get("status") == "completed"
        ]
        return {
            "busy_room_jobs": p.skew_busy_jobs,
            "free_rooms": p.skew_free_rooms,
            "free_completed": len(waits),
            "free_room_enqueue_to_end_s": spread(waits),
        }

    def back_to_back(self) -> dict[str, Any]:
        p = self.plan
        room = f"b2b-{self.tag}-{secrets.token_hex(3)}"
        workers = self._workers(p.quota)
        try:
            handles = [_enqueue(room, self.b2b_clip) for _ in range(p.b2b_jobs)]
            runs = collect(self.stack, handles, 60 + 3 * p.b2b_jobs * p.b2b_clip_s)
        finally:
            self._stop(workers)
        segs = _segments(_sessions(self.stack, {room}))
        gaps = [
            b["first_frame_at"] - (a.get("playback_finished_at") or a.get("last_frame_at"))
            for a, b in zip(segs, segs[1:], strict=False)
            if a.get("playback_finished_at") or a.get("last_frame_at")
        ]
        warm = [
            r.result["timestamps"]["first_byte"] - r.result["timestamps"]["picked"]
            for r in runs
            if r.result.get("status") == "completed" and r.result.get("warm")
        ]
        return {
            "jobs": p.b2b_jobs,
            "completed": len([r for r in runs if r.result.get("status") == "completed"]),
            "gap_s": spread(gaps),
            "warm_start_s": spread(warm),
            "goal_gap_p50_below_s": 0.3,
            "goal_warm_start_p50_below_s": 0.1,
        }


def bursts_summary(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Several bursts as one: the figures of the median drain's round, the guarantees (peak
    sessions, completion, order, retries) at their worst over all of them."""
    by_drain = sorted(rounds, key=lambda r: r["drain_s"])
    return {
        **by_drain[len(by_drain) // 2],
        "rounds": len(by_drain),
        "drain_s_rounds": [r["drain_s"] for r in by_drain],
        "completed": min(r["completed"] for r in by_drain),
        "peak_sessions": max(r["peak_sessions"] for r in by_drain),
        "retried_jobs": sum(r["retried_jobs"] for r in by_drain),
        "order_exact": all(r["order_exact"] for r in by_drain),
    }


def _wait_for_rest(stack: LocalStack, server: str = "default") -> float:
    """Until no earlier part's session slot or 429 cap weighs on this part's quota (bounded:
    past REST_WAIT_S the part runs anyway, and its figures show it); the seconds waited."""
    r = redis.Redis.from_url(stack.redis.url)
    began = time.monotonic()
    try:
        while time.monotonic() < began + REST_WAIT_S:
            held = r.zcount(avatar_quota_key(server, "sessions"), int(time.time() * 1000), "+inf")
            if not held and not r.exists(avatar_quota_key(server, "cap")):
                break
            time.sleep(0.5)
    finally:
        r.close()
    return round(time.monotonic() - began, 1)


def _where_the_time_went(
    completed: list[Played], sessions: list[dict[str, Any]], began: float, drain: float, quota: int
) -> dict[str, Any]:
    """What separates the drain from its ideal: the first audio's wait, each cold avatar's
    start, and how much of the quota's session time carried audio."""
    stamps = [r.result["timestamps"] for r in completed]
    cold = [t for r, t in zip(completed, stamps, strict=True) if not r.result.get("warm")]
    lived = [
        s["stopped_at"] - s["created_at"]
        for s in sessions
        if s.get("stopped_at") and s.get("created_at")
    ]
    audio = sum(r.result.get("audio_duration", 0.0) for r in completed)
    return {
        "first_audio_after_s": round(
            min((t["first_byte"] for t in stamps), default=began) - began, 3
        ),
        "cold_avatar_start_s": spread([t["avatar_ready"] - t["avatar_requested"] for t in cold]),
        "session_time_used_share": ratio(sum(lived), quota * drain),
        "audio_share_of_session_time": ratio(audio, sum(lived)),
    }


def _cpu(sampler: ProcessSampler, start: float, end: float) -> dict[str, Any]:
    """How busy the shared cores were while the burst drained, and who kept them busy: each
    process's median (% of one core; the workers summed)."""
    medians = {name: sampler.cpu_rss(name, start, end)[0] for name in sampler.processes}
    workers = sum(v for name, v in medians.items() if name.startswith("worker_"))
    return {
        "machine_busy_percent": sampler.busy(start, end),
        "cores": psutil.cpu_count(),
        "median_percent_of_a_core": {
            "workers": round(workers, 1),
            "livekit": medians["livekit"],
            "avatars": medians["avatars"],
        },
    }


def _order_exact(runs: list[Played], rooms: list[str]) -> bool:
    """Each room's jobs played one after another in enqueue order (from their timestamps)."""
    for room in rooms:
        stamps = [
            r.result["timestamps"]
            for r in runs
            if r.result.get("room") == room and r.result.get("status") == "completed"
        ]
        for a, b in zip(stamps, stamps[1:], strict=False):
            if b["first_byte"] < a["last_byte"]:
                return False
    return True


def bench_fleet(stack: LocalStack, plan: FleetPlan, light: LightAvatars) -> dict[str, Any]:
    """Lanes (the default) and the design before them, on the same stack, one after the other;
    then the lanes' burst against the light receivers, whose avatars take far less of the
    shared cores (as avatars on machines of their own would take none)."""
    requests.post(f"{stack.avatar_url}/_emulator/faults", json={"max_sessions": None}, timeout=5)
    lanes = FleetBench(stack, plan, lanes=True).run()
    polling = FleetBench(stack, plan, lanes=False).run()
    burst_light = FleetBench(stack, plan, lanes=True, light=light).burst()
    # The light receivers record no session's start and stop: no peak, no session time.
    for key in ("peak_sessions", "session_time_used_share", "audio_share_of_session_time"):
        burst_light.pop(key, None)
    return {
        "fleet": {
            "lanes": lanes,
            "polling": polling,
            "light": {"burst": burst_light},
            "ratio_burst_drain_polling_vs_lanes": ratio(
                polling["burst"]["drain_s"], lanes["burst"]["drain_s"]
            ),
        }
    }
