"""`avatarq faults`' verdict on a scenario's `Run`: the table's figures and what each scenario
must show.

Common to all: no job lost, none played twice, no overlap in a room (defined in
docs/guarantees.md); on top, each scenario's own `EXPECTATIONS`. tests/test_faults.py asserts
the same on the lab's observations with assertions of its own."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from avatarq.settings import Settings
from avatarq_dev.faults.lab import RECOVERY_GOAL_S, Run, Segment

#: A job counts as fully played when the avatar received all but this much of it.
FULL_PLAY_TOLERANCE_S = 0.2
#: Two segments of one room overlap when the next starts this long before the last ends.
OVERLAP_TOLERANCE_S = 0.05
#: What a resumed job may repeat: the resume overlap (a default setting) plus half a second.
HEARD_TWICE_LIMIT_S = Settings().resume_overlap_s + 0.5


@dataclass
class FaultReport:
    fault: str
    enqueued: int = 0
    completed: int = 0
    failed: int = 0
    cancelled: int = 0
    lost: int = 0
    played_twice: int = 0
    overlaps: int = 0
    recover_s: float | None = None
    #: Seconds of the jobs' sources the avatar never played, and played more than once, summed
    #: over the scenario's jobs; None when a recording could not be matched with its source.
    never_heard_s: float | None = None
    heard_twice_s: float | None = None
    #: Expectations of this scenario beyond the common ones, each True when met.
    checks: dict[str, bool] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        common = self.lost == 0 and self.played_twice == 0 and self.overlaps == 0
        return common and all(self.checks.values())

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


def whole(run: Run, s: Segment) -> bool:
    """The segment is the job's whole audio, uninterrupted."""
    return not s.interrupted and s.received_s >= (
        run.durations.get(s.job_id, 0.0) - FULL_PLAY_TOLERANCE_S
    )


def full_plays(run: Run, job_id: str) -> int:
    """How many times the avatar received the job's whole audio, uninterrupted."""
    return sum(1 for s in run.segments if s.job_id == job_id and whole(run, s))


def played(run: Run, room: str) -> list[str]:
    """The jobs of the room's uninterrupted segments, in order."""
    return [s.job_id for s in run.segments if s.room == room and not s.interrupted]


def listened(run: Run, job_id: str) -> tuple[float, float] | None:
    """(seconds never heard, seconds heard twice) of the job's source, from the spans of its
    segments; None when one of them could not be matched with the source. A job that never
    ended counts as lost, not here: its seconds not heard are not counted."""
    spans = []
    for s in run.segments:
        if s.job_id != job_id:
            continue
        if s.span is None:
            return None
        spans.append(s.span)
    spans.sort()
    covered, reach = 0.0, 0.0
    for a, b in spans:
        covered += max(0.0, b - max(a, reach))
        reach = max(reach, b)
    total = sum(b - a for a, b in spans)
    never = max(0.0, run.durations.get(job_id, 0.0) - covered)
    return never, total - covered


def judge(scenario: str, run: Run) -> FaultReport:
    report = FaultReport(
        run.fault,
        enqueued=len(run.ids),
        recover_s=run.recover_s,
        checks=EXPECTATIONS[scenario](run),
        notes=list(run.notes),
    )
    for job_id in run.ids:
        status = run.status(job_id)
        if status is None:
            report.lost += 1
            report.notes.append(f"lost {job_id}")
        elif status == "completed":
            report.completed += 1
        elif status == "failed":
            report.failed += 1
        else:
            report.cancelled += 1
        if full_plays(run, job_id) > 1:
            report.played_twice += 1
            report.notes.append(f"played twice {job_id}")
    heard = [listened(run, j) for j in run.ids]
    if all(h is not None for h in heard):
        report.never_heard_s = round(sum(h[0] for h in heard if h is not None), 3)
        report.heard_twice_s = round(sum(h[1] for h in heard if h is not None), 3)
    by_room: dict[str, list[Segment]] = {}
    for s in run.segments:
        if s.job_id in run.ids:
            by_room.setdefault(s.room, []).append(s)
    for room_segments in by_room.values():
        for a, b in zip(room_segments, room_segments[1:], strict=False):
            if b.start < a.end - OVERLAP_TOLERANCE_S:
                report.overlaps += 1
                report.notes.append(f"overlap {a.job_id} / {b.job_id}")
    return report


def leaked_secrets(exposed: dict[str, str], secrets: list[str]) -> list[str]:
    """The places (log files, Redis keys) of the lab's `exposed` text holding a secret."""
    return [place for place, text in exposed.items() for s in secrets if s in text]


# -- each scenario's expectations ------------------------------------------------------------
def _attempt(run: Run, job_id: str, status: str, attempt: int) -> bool:
    rec = run.records.get(job_id, {})
    return rec.get("status") == status and rec.get("attempt") == attempt


def _failed(rec: dict[str, Any], reason: str, attempt: int) -> bool:
    return rec.get("reason") == reason and rec.get("attempt") == attempt


def _all_completed(run: Run) -> bool:
    return all(run.status(j) == "completed" for j in run.ids)


def _within_goal(run: Run, job_id: str) -> bool:
    ended = run.ended_at(job_id)
    return ended is not None and ended - run.facts["killed_at"] < RECOVERY_GOAL_S


def _heard_once(run: Run) -> dict[str, bool]:
    heard = [listened(run, j) for j in run.ids]
    known = all(h is not None for h in heard)
    return {
        "nothing never heard": known and sum(h[0] for h in heard if h) == 0,
        f"heard twice ≤ {HEARD_TWICE_LIMIT_S:g} s": known
        and sum(h[1] for h in heard if h) <= HEARD_TWICE_LIMIT_S,
    }


def _in_order(run: Run) -> bool:
    """The run's jobs started their final attempts in enqueue order (their records)."""
    starts = [run.records.get(j, {}).get("timestamps", {}).get("first_byte") for j in run.ids]
    return all(t is not None for t in starts) and starts == sorted(starts)


def _sigkill_mid_stream(run: Run) -> dict[str, bool]:
    job = run.ids[0]
    return {
        "completed on attempt 2": _attempt(run, job, "completed", 2),
        f"completed within {RECOVERY_GOAL_S:g} s of the kill": _within_goal(run, job),
        **_heard_once(run),
        "room's next jobs followed in order": _in_order(run),
    }


def _sigkill_holding_waiting_jobs(run: Run) -> dict[str, bool]:
    return {
        "waiting jobs reported queued": run.facts["statuses_before_kill"] == ["queued"] * 2,
        "all completed": _all_completed(run),
        f"done within {RECOVERY_GOAL_S:g} s of the kill": run.recover_s is not None
        and run.recover_s < RECOVERY_GOAL_S,
        "played in order": played(run, run.facts["room"]) == run.ids,
    }


def _sigkill_during_avatar_start(run: Run) -> dict[str, bool]:
    (job,) = run.ids
    return {
        "completed": run.status(job) == "completed",
        f"completed within {RECOVERY_GOAL_S:g} s of the kill": _within_goal(run, job),
        "orphaned avatar session stopped": any(
            x.get("stop_reason") == "stop_request" and not x.get("segments") for x in run.sessions
        ),
    }


def _sigterm_mid_stream(run: Run) -> dict[str, bool]:
    return {
        "completed on attempt 2": _attempt(run, run.ids[0], "completed", 2),
        "stopping worker exited": run.facts["exited"],
        **_heard_once(run),
    }


def _sigterm_within_grace(run: Run) -> dict[str, bool]:
    return {
        "completed on attempt 1": _attempt(run, run.ids[0], "completed", 1),
        "worker exited after the job": run.facts["exited"],
    }


def _redis_fault(run: Run) -> dict[str, bool]:
    return {
        "all completed": _all_completed(run),
        "worker survived": run.facts["worker_alive"] and not run.facts["worker_crashed"],
    }


def _livekit_restart(run: Run) -> dict[str, bool]:
    return {"completed": run.status(run.ids[0]) == "completed", **_heard_once(run)}


def _avatar_500_then_200(run: Run) -> dict[str, bool]:
    return {"completed on attempt 1": _attempt(run, run.ids[0], "completed", 1)}


def _avatar_never_joins(run: Run) -> dict[str, bool]:
    return {
        "failed avatar_timeout after 3 attempts": _failed(
            run.records.get(run.ids[0], {}), "avatar_timeout", 3
        ),
        "dead-lettered": run.facts["dead_lettered"],
    }


def _avatar_leaves_mid_stream(run: Run) -> dict[str, bool]:
    return {
        "failed avatar_left after 3 attempts": _failed(run.facts["first_record"], "avatar_left", 3),
        "dead-lettered": run.facts["dead_lettered"],
        "replayed from the dead letters": run.status(run.ids[0]) == "completed",
    }


def _s3_object_missing(run: Run) -> dict[str, bool]:
    missing, present = run.ids
    gone = run.records.get(missing, {})
    return {
        "missing: source_not_found, no retry": _failed(gone, "source_not_found", 1)
        and "missing.wav" in gone.get("error", ""),
        "present: completed": run.status(present) == "completed",
    }


def _corrupt_audio(run: Run) -> dict[str, bool]:
    return {
        "failed invalid_audio, no retry": _failed(
            run.records.get(run.ids[0], {}), "invalid_audio", 1
        )
    }


def _same_room_20(run: Run) -> dict[str, bool]:
    return {
        "all completed": _all_completed(run),
        "played in enqueue order": played(run, run.facts["room"]) == run.ids,
    }


def _same_job_id_5x(run: Run) -> dict[str, bool]:
    return {"one avatar segment": sum(s.job_id == run.ids[0] for s in run.segments) == 1}


def _cancellation(run: Run) -> dict[str, bool]:
    playing, queued = run.ids
    p, q = run.records.get(playing, {}), run.records.get(queued, {})
    return {
        "cancel saw queued / playing": run.facts["cancel_answers"] == ("queued", "playing"),
        "queued job never reached the avatar": not any(s.job_id == queued for s in run.segments),
        "playing job stopped within 0.5 s": run.recover_s is not None and run.recover_s < 0.5,
        "playback position reported": (p.get("playback_position") or 0) > 0.5,
        "cancelled while playing": p.get("cancelled_while") == "playing",
        "cancelled while queued": q.get("cancelled_while") == "queued",
    }


def _warm_session_elsewhere(run: Run) -> dict[str, bool]:
    first, _busy, second = run.ids
    sessions = {s["session_id"]: s for s in run.sessions}
    held = sessions.get(run.records.get(first, {}).get("avatar_session_id"), {})
    return {
        "all completed": _all_completed(run),
        "second started cold": run.records.get(second, {}).get("warm") is False,
        "idle session let go, not knocked out": held.get("stop_reason") == "stop_request",
    }


def _raw_payload_without_job_id(run: Run) -> dict[str, bool]:
    return {
        "completed under its task id": run.status(run.ids[1]) == "completed",
        "room's order left empty": run.facts["room_order_left"] == [],
    }


def _garbage_with_another_jobs_id(run: Run) -> dict[str, bool]:
    return {"named job completed": run.status(run.ids[1]) == "completed"}


def _slow_origin_goes_dark(run: Run) -> dict[str, bool]:
    return {
        "completed": run.status(run.ids[0]) == "completed",
        "stall ended the segment with source_stalled": run.facts["stalls"] >= 1,
        **_heard_once(run),
    }


def _worker_cut_off_from_redis(run: Run) -> dict[str, bool]:
    job = run.ids[0]
    after = [e for e in run.events.get(job, []) if e["ts"] > run.facts["taken_over_at"]]
    return {
        "completed by the next delivery": _attempt(run, job, "completed", 2),
        "cut-off attempt silent once taken over": all(e.get("attempt") in (None, 2) for e in after)
        and not any(e["event"] == "job.retrying" for e in after)
        and not run.facts["victim_retried"],
        **_heard_once(run),
    }


def _avatar_server_dies(run: Run) -> dict[str, bool]:
    rec = run.records.get(run.ids[0], {})
    return {
        "completed on a new session": rec.get("status") == "completed"
        and rec.get("attempt", 0) >= 2,
        **_heard_once(run),
    }


EXPECTATIONS: dict[str, Callable[[Run], dict[str, bool]]] = {
    "sigkill_mid_stream": _sigkill_mid_stream,
    "sigkill_holding_waiting_jobs": _sigkill_holding_waiting_jobs,
    "sigkill_during_avatar_start": _sigkill_during_avatar_start,
    "sigterm_mid_stream": _sigterm_mid_stream,
    "sigterm_within_grace": _sigterm_within_grace,
    "redis_restart": _redis_fault,
    "redis_crash": _redis_fault,
    "livekit_restart": _livekit_restart,
    "avatar_500_then_200": _avatar_500_then_200,
    "avatar_never_joins": _avatar_never_joins,
    "avatar_leaves_mid_stream": _avatar_leaves_mid_stream,
    "s3_object_missing": _s3_object_missing,
    "corrupt_audio": _corrupt_audio,
    "same_room_20": _same_room_20,
    "same_job_id_5x": _same_job_id_5x,
    "cancellation": _cancellation,
    "warm_session_elsewhere": _warm_session_elsewhere,
    "raw_payload_without_job_id": _raw_payload_without_job_id,
    "garbage_with_another_jobs_id": _garbage_with_another_jobs_id,
    "slow_origin_goes_dark": _slow_origin_goes_dark,
    "worker_cut_off_from_redis": _worker_cut_off_from_redis,
    "avatar_server_dies": _avatar_server_dies,
}
