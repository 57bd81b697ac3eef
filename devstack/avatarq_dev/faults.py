"""The fault suite: each fault injected into the real local stack, with figures.

Every scenario enqueues jobs, injects one fault, waits until every job has ended, and reports
jobs enqueued, completed / failed / cancelled, lost (never reached a terminal state), played
twice (the avatar played a job's whole audio more than once, read from the avatar's own
recordings), overlaps (two segments in one room at the same time) and the time to recover.
`tests/test_faults.py` runs each scenario on both brokers (Redis, RabbitMQ); `avatarq faults`
prints the table.

Every scenario runs with default settings, as a user has them: the broker's visibility timeout
(the longest job + 10 minutes), redis-server's own default persistence (RDB snapshots, saved
on shutdown, nothing on a crash), default retries and timeouts. The few that change one say
why, next to it (`Scenario.env`).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import redis
import requests

from avatarq.dev.processes import ManagedProcess, free_port, python_module, tcp_ready
from avatarq.dev.stack import LocalStack, local_stack
from avatarq.ledger.keys import DEAD_LETTER_KEY, job_events_key, room_order_key
from avatarq.settings import get_settings

#: What every worker of the suite gets: moto's S3 credentials. No avatarq setting.
WORKER_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}
#: The failure scenarios (an avatar that never joins or always leaves) retry to exhaustion:
#: with the defaults (30 s join timeout, 4 retries, 2-60 s backoff) one would take minutes.
FAST_FAILURE_ENV = {
    "AVATARQ_MAX_RETRIES": "2",
    "AVATARQ_RETRY_BASE": "0.2",
    "AVATARQ_RETRY_CAP": "1",
    "AVATARQ_AVATAR_START_ATTEMPTS": "2",
    "AVATARQ_AVATAR_JOIN_TIMEOUT": "4",
    "AVATARQ_PLAYBACK_FINISHED_TIMEOUT": "5",
}
#: Recovery from SIGKILL must beat this (issue 10's goal), kill to completion.
RECOVERY_GOAL_S = 60.0
JOB_TIMEOUT_S = 120.0
BUCKET = "faults"
#: A job counts as fully played when the avatar received all but this much of it.
FULL_PLAY_TOLERANCE_S = 0.2


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
    #: Expectations of this scenario beyond the common ones, each True when met.
    checks: dict[str, bool] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        common = self.lost == 0 and self.played_twice == 0 and self.overlaps == 0
        return common and all(self.checks.values())

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


@dataclass(frozen=True)
class Segment:
    job_id: str
    room: str
    start: float
    end: float
    received_s: float
    interrupted: bool


class FaultLab:
    """A local stack (persistent Redis, moto S3) plus the tools to break it and judge."""

    def __init__(self, stack: LocalStack, s3_endpoint: str, clips: Path) -> None:
        self.stack = stack
        self.broker = "rabbitmq" if stack.rabbitmq else "redis"
        self.s3_endpoint = s3_endpoint
        self.clips = clips
        self.redis: Any = redis.Redis.from_url(stack.redis.url)  # bytes replies; loose stubs
        self.durations: dict[str, float] = {}
        #: When each completed job streamed (first to last byte): a warm avatar
        #: session plays several jobs, so its sender alone does not say whose a segment is.
        self.windows: dict[str, tuple[str, float, float]] = {}
        self._workers = 0

    # -- jobs ------------------------------------------------------------------------------
    def clip(self, seconds: float) -> Path:
        """A WAV tone of exactly `seconds` at 16 kHz mono (what the worker sends)."""
        path = self.clips / f"tone-{seconds:g}.wav"
        if not path.exists():
            from tasks.decode import ffmpeg_binary

            subprocess.run(
                [
                    ffmpeg_binary(get_settings()), "-nostdin", "-loglevel", "error", "-y",
                    "-f", "lavfi", "-i", f"sine=frequency=440:sample_rate=16000:duration={seconds}",
                    "-ac", "1", "-c:a", "pcm_s16le", str(path),
                ],
                check=True,
                timeout=60,
            )  # fmt: skip
        return path

    def enqueue(self, room: str, seconds: float = 1.0, **job: Any) -> str:
        from producers import enqueue

        job.setdefault("source", str(self.clip(seconds)))
        handle = enqueue({"room": room, "avatar_id": "fault", "lead": 0.3, **job})
        self.durations[handle.job_id] = seconds
        return handle.job_id

    def send_raw(self, payload: Any, seconds: float = 1.0) -> str:
        """Send a payload as any producer could (plain `send_task`, no `enqueue`); returns the
        Celery task id."""
        from avatarq.celeryconfig import RENDER_QUEUE, RENDER_TASK
        from producers.client import celery_app

        result = celery_app().send_task(RENDER_TASK, args=[payload], queue=RENDER_QUEUE)
        self.durations[result.id] = seconds
        return str(result.id)

    def wait(self, ids: list[str], timeout: float = JOB_TIMEOUT_S) -> dict[str, dict[str, Any]]:
        """Terminal records of `ids`, waiting up to `timeout`; missing ones were lost."""
        from producers import get_status
        from producers.client import is_terminal

        ended: dict[str, dict[str, Any]] = {}
        deadline = time.monotonic() + timeout
        while len(ended) < len(ids) and time.monotonic() < deadline:
            for job_id in ids:
                if job_id not in ended and is_terminal(status := get_status(job_id)):
                    ended[job_id] = status
                    ts = status.get("timestamps") or {}
                    if ts.get("first_byte") and ts.get("last_byte"):
                        window = (ts["first_byte"] - 0.05, ts["last_byte"] + 0.05)
                        self.windows[job_id] = (status.get("room", ""), *window)
            time.sleep(0.2)
        return ended

    def events(self, job_id: str) -> list[dict[str, Any]]:
        return [
            {"event": f[b"event"].decode(), "ts": float(f[b"ts"]), **json.loads(f[b"data"])}
            for _id, f in self.redis.xrange(job_events_key(job_id))
        ]

    def wait_event(
        self, job_id: str, event: str, *, attempt: int | None = None, timeout: float = 60.0
    ) -> float:
        """Timestamp of the job's first `event` (of `attempt`, if given)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for e in self.events(job_id):
                if e["event"] == event and attempt in (None, e.get("attempt")):
                    return float(e["ts"])
            time.sleep(0.1)
        raise TimeoutError(f"job {job_id}: no {event} (attempt {attempt}) in {timeout:g}s")

    def started_attempt(self, job_id: str, attempt: int, timeout: float = 90.0) -> float:
        return self.wait_event(job_id, "job.started", attempt=attempt, timeout=timeout)

    def ended_at(self, job_id: str) -> float | None:
        for e in self.events(job_id):
            if e["event"] in ("job.completed", "job.failed", "job.cancelled"):
                return float(e["ts"])
        return None

    # -- faults ----------------------------------------------------------------------------
    def avatar_faults(self, **changes: Any) -> None:
        url = f"{self.stack.avatar_url}/_emulator/faults"
        requests.post(url, json=changes, timeout=5).raise_for_status()

    def reset_avatar(self) -> None:
        self.avatar_faults(fail_next_starts=0, join=True, leave_after_s=None)

    @contextlib.contextmanager
    def workers(
        self,
        count: int = 1,
        concurrency: int = 4,
        env: dict[str, str] | None = None,
        **more: str,
    ) -> Iterator[list[Any]]:
        """Start `count` fresh workers for one scenario (with settings `env` and `more`);
        stop them afterwards."""
        procs = []
        for _ in range(count):
            procs.append(self.start_worker(concurrency=concurrency, **(env or {}), **more))
        try:
            yield procs
        finally:
            for p in procs:
                p.stop()

    def start_worker(self, concurrency: int = 4, **env: str) -> ManagedProcess:
        self._workers += 1
        return self.stack.start_worker(
            f"f{self._workers}", concurrency=concurrency, extra_env={**self.worker_env(), **env}
        )

    def worker_env(self) -> dict[str, str]:
        return {**WORKER_ENV, "AWS_ENDPOINT_URL_S3": self.s3_endpoint}

    # -- judging ---------------------------------------------------------------------------
    def sessions(self) -> list[dict[str, Any]]:
        """Every avatar session's record (the emulator's JSON sidecars)."""
        return [json.loads(p.read_text()) for p in sorted(self.stack.recordings.glob("*.json"))]

    def segments(self) -> list[Segment]:
        """Every audio segment the avatar received, from its recordings."""
        out = []
        for session in self.sessions():
            sender = session.get("sender_identity") or ""
            for seg in session.get("segments", []):
                start = seg.get("first_frame_at")
                if start is None:
                    continue
                end = seg.get("playback_finished_at") or seg.get("last_frame_at") or start
                job_id = next(
                    (
                        j
                        for j, (room, a, b) in self.windows.items()
                        if room == session["room"] and a <= start <= b
                    ),
                    sender.removeprefix("avatarq-"),
                )
                out.append(
                    Segment(
                        job_id,
                        session["room"],
                        start,
                        end,
                        float(seg.get("received_s", 0.0)),
                        bool(seg.get("interrupted")),
                    )
                )
        return sorted(out, key=lambda s: s.start)

    def _whole(self, s: Segment) -> bool:
        return not s.interrupted and s.received_s >= (
            self.durations.get(s.job_id, 0.0) - FULL_PLAY_TOLERANCE_S
        )

    def full_plays(self, job_id: str) -> int:
        """How many times the avatar received the job's whole audio, uninterrupted."""
        return sum(1 for s in self.segments() if s.job_id == job_id and self._whole(s))

    def played_in_full(self, room: str) -> list[str]:
        """The jobs the room's avatar played whole, in the order it played them (a killed
        worker's cut-off segment is not one)."""
        return [s.job_id for s in self.segments() if s.room == room and self._whole(s)]

    def judge(
        self,
        fault: str,
        ids: list[str],
        records: dict[str, dict[str, Any]],
        *,
        recover_s: float | None = None,
        checks: dict[str, bool] | None = None,
    ) -> FaultReport:
        time.sleep(1.5)  # let avatar sessions of killed workers notice the empty room
        report = FaultReport(fault, enqueued=len(ids), recover_s=recover_s, checks=checks or {})
        for job_id in ids:
            status = records.get(job_id, {}).get("status")
            if status is None:
                report.lost += 1
                report.notes.append(f"lost {job_id}")
            elif status == "completed":
                report.completed += 1
            elif status == "failed":
                report.failed += 1
            else:
                report.cancelled += 1
        segments = [s for s in self.segments() if s.job_id in ids]
        for job_id in ids:
            if self.full_plays(job_id) > 1:
                report.played_twice += 1
                report.notes.append(f"played twice {job_id}")
        by_room: dict[str, list[Segment]] = {}
        for s in segments:
            by_room.setdefault(s.room, []).append(s)
        for room_segments in by_room.values():
            for a, b in zip(room_segments, room_segments[1:], strict=False):
                if b.start < a.end - 0.05:
                    report.overlaps += 1
                    report.notes.append(f"overlap {a.job_id} / {b.job_id}")
        return report


def _room(name: str) -> str:
    return f"{name}-{secrets.token_hex(3)}"


# -- scenarios --------------------------------------------------------------------------------
def sigkill_mid_stream(lab: FaultLab) -> FaultReport:
    """SIGKILL the worker playing a job, two more jobs of its room queued behind it: its
    heartbeat and lease lapse (15 s), a live worker's sweep publishes it again, and it plays in
    full once on that worker, long before the broker's visibility timeout; the room's next
    jobs follow in order."""
    room = _room("kill")
    with lab.workers(1, concurrency=1) as (victim,):
        job = lab.enqueue(room, 6.0)
        lab.wait_event(job, "job.avatar_ready")
        time.sleep(1.0)
        with lab.workers(1):
            behind = [lab.enqueue(room, 1.0) for _ in range(2)]
            killed_at = time.time()
            victim.signal(signal.SIGKILL)
            recover = lab.started_attempt(job, 2, timeout=RECOVERY_GOAL_S) - killed_at
            records = lab.wait([job, *behind])
    rec = records.get(job, {})
    ended = lab.ended_at(job)
    return lab.judge(
        "SIGKILL worker mid-stream",
        [job, *behind],
        records,
        recover_s=recover,
        checks={
            "completed on attempt 2": rec.get("status") == "completed" and rec.get("attempt") == 2,
            f"completed within {RECOVERY_GOAL_S:g} s of the kill": ended is not None
            and ended - killed_at < RECOVERY_GOAL_S,
            "played in full": lab.full_plays(job) == 1,
            "room's next jobs followed in order": lab.played_in_full(room) == [job, *behind],
        },
    )


def sigkill_holding_waiting_jobs(lab: FaultLab) -> FaultReport:
    """SIGKILL a worker that holds only waiting jobs (their room plays elsewhere): they are
    reported queued, not playing, and the live worker plays them in order soon after."""
    room = _room("strand")
    with lab.workers(1, concurrency=1):
        head = lab.enqueue(room, 5.0)
        lab.wait_event(head, "job.avatar_ready")
        with lab.workers(1) as (victim,):
            waiting = [lab.enqueue(room, 1.0) for _ in range(2)]
            time.sleep(1.5)  # both are in the victim's slots, waiting for the room
            from producers import get_status

            statuses = [get_status(j).get("status") for j in waiting]
            killed_at = time.time()
            victim.signal(signal.SIGKILL)
            records = lab.wait([head, *waiting])
    ends = [t for t in (lab.ended_at(j) for j in waiting) if t is not None]
    recover = max(ends) - killed_at if len(ends) == len(waiting) else None
    played = [s.job_id for s in lab.segments() if s.room == room and not s.interrupted]
    return lab.judge(
        "SIGKILL worker holding only waiting jobs",
        [head, *waiting],
        records,
        recover_s=recover,
        checks={
            "waiting jobs reported queued": statuses == ["queued", "queued"],
            "all completed": all(r.get("status") == "completed" for r in records.values()),
            f"done within {RECOVERY_GOAL_S:g} s of the kill": recover is not None
            and recover < RECOVERY_GOAL_S,
            "played in order": played == [head, *waiting],
        },
    )


def sigkill_during_avatar_start(lab: FaultLab) -> FaultReport:
    """SIGKILL the worker while its avatar session starts (the avatar accepted, not joined):
    recovery stops that orphaned session and plays the job on a live worker."""
    room = _room("killstart")
    with lab.workers(1) as (victim,):
        lab.avatar_faults(join=False)
        try:
            job = lab.enqueue(room, 2.0)
            lab.wait_event(job, "job.started")
            time.sleep(2.0)  # past start-avatar, waiting for the avatar to join
            killed_at = time.time()
            victim.signal(signal.SIGKILL)
        finally:
            lab.reset_avatar()
    with lab.workers(1):
        records = lab.wait([job])
    ended = lab.ended_at(job)
    sessions = [x for x in lab.sessions() if x.get("room") == room]
    return lab.judge(
        "SIGKILL worker during avatar start",
        [job],
        records,
        recover_s=ended - killed_at if ended else None,
        checks={
            "completed": records.get(job, {}).get("status") == "completed",
            f"completed within {RECOVERY_GOAL_S:g} s of the kill": ended is not None
            and ended - killed_at < RECOVERY_GOAL_S,
            "orphaned avatar session stopped": any(
                x.get("stop_reason") == "stop_request" and not x.get("segments") for x in sessions
            ),
        },
    )


def sigterm_mid_stream(lab: FaultLab) -> FaultReport:
    """SIGTERM with a 1 s grace: the playing job is handed back and played from the start by
    another worker; the stopping worker exits."""
    # Non-default grace: a hand-back needs a job longer than the grace (default 30 s).
    with lab.workers(1, AVATARQ_SHUTDOWN_GRACE="1") as (victim,):
        job = lab.enqueue(_room("term"), 6.0)
        lab.wait_event(job, "job.avatar_ready")
        time.sleep(1.0)
        with lab.workers(1):
            term_at = time.time()
            victim.signal(signal.SIGTERM)
            recover = lab.started_attempt(job, 2) - term_at
            records = lab.wait([job])
            exited = victim.proc is not None and _exits(victim, 20.0)
    rec = records.get(job, {})
    report = lab.judge(
        "SIGTERM worker mid-stream (grace 1 s)",
        [job],
        records,
        recover_s=recover,
        checks={
            "completed on attempt 2": rec.get("status") == "completed" and rec.get("attempt") == 2,
            "stopping worker exited": exited,
        },
    )
    report.notes.append(f"ended {rec.get('status')} on attempt {rec.get('attempt')}")
    report.notes += [
        f"{e['event']} attempt {e.get('attempt')}: {e.get('reason')} {e.get('error', '')}"
        for e in lab.events(job)
        if e["event"] in ("job.retrying", "job.started")
    ]
    return report


def sigterm_within_grace(lab: FaultLab) -> FaultReport:
    """SIGTERM with a grace longer than the job: it finishes where it was."""
    with lab.workers(1) as (worker,):  # the default grace (30 s) outlasts the job
        job = lab.enqueue(_room("grace"), 3.0)
        lab.wait_event(job, "job.avatar_ready")
        worker.signal(signal.SIGTERM)
        records = lab.wait([job])
        exited = _exits(worker, 30.0)
    rec = records.get(job, {})
    return lab.judge(
        "SIGTERM within the grace period",
        [job],
        records,
        checks={
            "completed on attempt 1": rec.get("status") == "completed" and rec.get("attempt") == 1,
            "worker exited after the job": exited,
        },
    )


def _redis_fault(lab: FaultLab, name: str, *, crash: bool) -> FaultReport:
    """Restart Redis (results, ledger, and broker unless RabbitMQ is) with one job playing and
    two of its room waiting in the same worker, plus one of another room; redis-server's own
    default persistence, so a crash loses what Redis held (the room's order, the lease) and a
    graceful restart saves it first. The worker must survive, and the room must not play two
    jobs at once while the playing job re-asserts its place."""
    with lab.workers(1) as (worker,):
        room = _room("redis")
        ids = [lab.enqueue(room, 4.0)] + [lab.enqueue(room, 1.0) for _ in range(2)]
        # Still playing at the fault: a record written before a crash is lost with the rest
        # of what redis-server had not yet saved (README: Guarantees).
        ids.append(lab.enqueue(_room("redis-other"), 4.0))
        lab.wait_event(ids[0], "job.avatar_ready")
        lab.wait_event(ids[-1], "job.avatar_ready")
        time.sleep(1.0)
        fault_at = time.time()
        if crash:
            lab.stack.redis.signal(signal.SIGKILL)
            assert lab.stack.redis.proc is not None
            lab.stack.redis.proc.wait(10)
        else:
            lab.stack.redis.stop()
        lab.stack.redis.start()
        records = lab.wait(ids)
        alive = worker.proc is not None and worker.proc.poll() is None
        crashed = "Unrecoverable error" in worker.tail(2000)
    ends = [t for t in (lab.ended_at(i) for i in ids) if t is not None and t > fault_at]
    return lab.judge(
        name,
        ids,
        records,
        recover_s=min(ends) - fault_at if ends else None,
        checks={
            "all completed": all(r.get("status") == "completed" for r in records.values()),
            "worker survived": alive and not crashed,
        },
    )


def redis_restart(lab: FaultLab) -> FaultReport:
    return _redis_fault(lab, "Redis restart, graceful (1 playing, 3 held)", crash=False)


def redis_crash(lab: FaultLab) -> FaultReport:
    return _redis_fault(lab, "Redis crash, SIGKILL (1 playing, 3 held)", crash=True)


def livekit_restart(lab: FaultLab) -> FaultReport:
    """Kill the LiveKit server mid-stream and start it again on the same port."""
    with lab.workers(1):
        job = lab.enqueue(_room("lk"), 6.0)
        lab.wait_event(job, "job.avatar_ready")
        time.sleep(1.5)
        fault_at = time.time()
        lab.stack.livekit.signal(signal.SIGKILL)
        assert lab.stack.livekit.proc is not None
        lab.stack.livekit.proc.wait(10)
        lab.stack.livekit.start()
        records = lab.wait([job])
    end = lab.ended_at(job)
    return lab.judge(
        "LiveKit server restart mid-stream",
        [job],
        records,
        recover_s=end - fault_at if end else None,
        checks={"completed": records.get(job, {}).get("status") == "completed"},
    )


def avatar_500_then_200(lab: FaultLab) -> FaultReport:
    with lab.workers(1):
        lab.avatar_faults(fail_next_starts=1, fail_status=500)
        job = lab.enqueue(_room("a500"), 1.0)
        records = lab.wait([job])
    rec = records.get(job, {})
    return lab.judge(
        "avatar server 500, then 200",
        [job],
        records,
        checks={
            "completed on attempt 1": rec.get("status") == "completed" and rec.get("attempt") == 1
        },
    )


def avatar_never_joins(lab: FaultLab) -> FaultReport:
    with lab.workers(1, env=FAST_FAILURE_ENV):  # retried to exhaustion: minutes by default
        lab.avatar_faults(join=False)
        try:
            job = lab.enqueue(_room("nojoin"), 1.0)
            records = lab.wait([job])
        finally:
            lab.reset_avatar()
    rec = records.get(job, {})
    return lab.judge(
        "avatar never joins",
        [job],
        records,
        checks={
            "failed avatar_timeout after 3 attempts": rec.get("reason") == "avatar_timeout"
            and rec.get("attempt") == 3,
            "dead-lettered": _dead(lab, job),
        },
    )


def avatar_leaves_mid_stream(lab: FaultLab) -> FaultReport:
    """The avatar leaves 1 s in, every time: retried, dead-lettered, then replayed by an
    operator once the avatar behaves."""
    from producers.deadletter import retry_dead

    with lab.workers(1, env=FAST_FAILURE_ENV):  # retried to exhaustion: minutes by default
        lab.avatar_faults(leave_after_s=1.0)
        try:
            job = lab.enqueue(_room("leave"), 4.0)
            first = lab.wait([job]).get(job, {})
        finally:
            lab.reset_avatar()
        dead = _dead(lab, job)
        retry_dead(job)
        records = lab.wait([job])
    return lab.judge(
        "avatar leaves mid-stream",
        [job],
        records,
        checks={
            "failed avatar_left after 3 attempts": first.get("reason") == "avatar_left"
            and first.get("attempt") == 3,
            "dead-lettered": dead,
            "replayed from the dead letters": records.get(job, {}).get("status") == "completed",
        },
    )


def s3_object_missing(lab: FaultLab) -> FaultReport:
    """A missing S3 object fails at once, for good; a present one plays."""
    import boto3

    s3 = boto3.client(
        "s3",
        endpoint_url=lab.s3_endpoint,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    )
    with contextlib.suppress(s3.exceptions.BucketAlreadyOwnedByYou):
        s3.create_bucket(Bucket=BUCKET)
    s3.upload_file(str(lab.clip(1.0)), BUCKET, "present.wav")
    with lab.workers(1):
        missing = lab.enqueue(_room("s3"), 1.0, source=f"s3://{BUCKET}/missing.wav")
        present = lab.enqueue(_room("s3"), 1.0, source=f"s3://{BUCKET}/present.wav")
        records = lab.wait([missing, present])
    gone = records.get(missing, {})
    return lab.judge(
        "S3 object missing",
        [missing, present],
        records,
        checks={
            "missing: source_not_found, no retry": gone.get("reason") == "source_not_found"
            and gone.get("attempt") == 1
            and "missing.wav" in gone.get("error", ""),
            "present: completed": records.get(present, {}).get("status") == "completed",
        },
    )


def corrupt_audio(lab: FaultLab) -> FaultReport:
    bad = lab.clips / "corrupt.mp3"
    bad.write_bytes(os.urandom(20_000))
    with lab.workers(1):
        job = lab.enqueue(_room("corrupt"), 1.0, source=str(bad))
        records = lab.wait([job])
    rec = records.get(job, {})
    return lab.judge(
        "corrupt audio",
        [job],
        records,
        checks={"failed invalid_audio, no retry": rec.get("reason") == "invalid_audio"
                and rec.get("attempt") == 1},
    )  # fmt: skip


def same_room_20(lab: FaultLab) -> FaultReport:
    """20 jobs for one room at once, 2 workers × 4 slots: one at a time, in enqueue order."""
    room = _room("busy")
    with lab.workers(2, concurrency=4):
        ids = [lab.enqueue(room, 0.5) for _ in range(20)]
        records = lab.wait(ids, timeout=240)
    played = [s.job_id for s in lab.segments() if s.room == room and not s.interrupted]
    return lab.judge(
        "20 concurrent jobs, same room",
        ids,
        records,
        checks={
            "all completed": all(r.get("status") == "completed" for r in records.values()),
            "played in enqueue order": played == ids,
        },
    )


def same_job_id_5x(lab: FaultLab) -> FaultReport:
    with lab.workers(1):
        job_id = f"dup-{secrets.token_hex(4)}"
        for _ in range(5):
            lab.enqueue(_room("dup"), 1.0, job_id=job_id)
        records = lab.wait([job_id])
        time.sleep(2.0)  # a second delivery, if any, would have started by now
    sessions = [s for s in lab.segments() if s.job_id == job_id]
    return lab.judge(
        "same job id enqueued 5 times",
        [job_id],
        records,
        checks={"one avatar segment": len(sessions) == 1},
    )


def cancellation(lab: FaultLab) -> FaultReport:
    """Cancel a queued job and a playing one (it must stop within 0.5 s)."""
    from producers import cancel

    room = _room("cancel")
    with lab.workers(1):
        playing = lab.enqueue(room, 6.0)
        queued = lab.enqueue(room, 1.0)
        lab.wait_event(playing, "job.avatar_ready")
        was_queued = cancel(queued)
        time.sleep(1.5)
        asked_at = time.time()
        was_playing = cancel(playing)
        records = lab.wait([playing, queued])
    p, q = records.get(playing, {}), records.get(queued, {})
    stopped_in = (p.get("stopped_at") or 1e12) - asked_at
    return lab.judge(
        "cancel while queued and while playing",
        [playing, queued],
        records,
        recover_s=stopped_in,
        checks={
            "cancel saw queued / playing": (was_queued, was_playing) == ("queued", "playing"),
            "queued job never reached the avatar": not any(
                s.job_id == queued for s in lab.segments()
            ),
            "playing job stopped within 0.5 s": stopped_in < 0.5,
            "playback position reported": (p.get("playback_position") or 0) > 0.5,
            "cancelled while playing": p.get("cancelled_while") == "playing",
            "cancelled while queued": q.get("cancelled_while") == "queued",
        },
    )


def warm_session_elsewhere(lab: FaultLab) -> FaultReport:
    """The next job of a room lands on another worker than the one keeping the room's avatar
    warm: that worker lets its idle session go first, so the two never collide."""
    room = _room("warm")
    with lab.workers(1, concurrency=1, AVATARQ_WARM_IDLE="30") as (holder,):
        first = lab.enqueue(room, 1.0)
        lab.wait([first])
        busy = lab.enqueue(_room("busy"), 4.0)  # the holder's only slot is taken...
        lab.wait_event(busy, "job.avatar_ready")
        with lab.workers(1, AVATARQ_WARM_IDLE="30"):
            second = lab.enqueue(room, 1.0)  # ...so another worker plays this one
            records = lab.wait([first, busy, second])
    sessions = {s["session_id"]: s for s in lab.sessions()}
    held = sessions.get(records.get(first, {}).get("avatar_session_id"), {})
    return lab.judge(
        "next job of a warm room on another worker",
        [first, busy, second],
        records,
        checks={
            "all completed": all(r.get("status") == "completed" for r in records.values()),
            "second started cold": records.get(second, {}).get("warm") is False,
            "idle session let go, not knocked out": held.get("stop_reason") == "stop_request",
        },
    )


def raw_payload_without_job_id(lab: FaultLab) -> FaultReport:
    """A producer in another language sends the payload with plain `send_task` and no job id,
    into a busy room: every requeue keeps the id (the Celery task id), so it plays, once."""
    room = _room("raw")
    with lab.workers(1):
        head = lab.enqueue(room, 3.0)
        lab.wait_event(head, "job.avatar_ready")
        raw = lab.send_raw(
            {"room": room, "avatar_id": "fault", "lead": 0.3, "source": str(lab.clip(1.0))}
        )
        records = lab.wait([head, raw])
        order_left = lab.redis.lrange(room_order_key(room), 0, -1)
    return lab.judge(
        "raw send_task without job_id, busy room",
        [head, raw],
        records,
        checks={
            "completed under its task id": records.get(raw, {}).get("status") == "completed",
            "room's order left empty": order_left == [],
        },
    )


def garbage_with_another_jobs_id(lab: FaultLab) -> FaultReport:
    """A message that fails validation names a queued job's id: it is dropped, and the job it
    names still plays."""
    room = _room("garbage")
    with lab.workers(1):
        head = lab.enqueue(room, 3.0)
        victim = lab.enqueue(room, 1.0)
        lab.wait_event(head, "job.avatar_ready")
        lab.send_raw({"job_id": victim, "room": 42, "bogus": True})
        records = lab.wait([head, victim])
    return lab.judge(
        "invalid message carrying another job's id",
        [head, victim],
        records,
        checks={"named job completed": records.get(victim, {}).get("status") == "completed"},
    )


def _dead(lab: FaultLab, job_id: str) -> bool:
    return any(
        json.loads(raw)["job_id"] == job_id for raw in lab.redis.lrange(DEAD_LETTER_KEY, 0, -1)
    )


def _exits(proc: ManagedProcess, timeout: float) -> bool:
    assert proc.proc is not None
    try:
        proc.proc.wait(timeout)
    except subprocess.TimeoutExpired:
        return False
    return True


SCENARIOS: dict[str, Callable[[FaultLab], FaultReport]] = {
    f.__name__: f
    for f in (
        sigkill_mid_stream,
        sigkill_holding_waiting_jobs,
        sigkill_during_avatar_start,
        sigterm_mid_stream,
        sigterm_within_grace,
        redis_restart,
        redis_crash,
        livekit_restart,
        avatar_500_then_200,
        avatar_never_joins,
        avatar_leaves_mid_stream,
        s3_object_missing,
        corrupt_audio,
        same_room_20,
        same_job_id_5x,
        cancellation,
        warm_session_elsewhere,
        raw_payload_without_job_id,
        garbage_with_another_jobs_id,
    )
}


@contextlib.contextmanager
def fault_lab(workdir: Path, broker: Literal["redis", "rabbitmq"] = "redis") -> Iterator[FaultLab]:
    """The stack the faults run on, with distinctive secrets so a leak can be found: Redis
    with redis-server's default persistence, and RabbitMQ as the broker if asked."""
    api_secret = "lk-secret-" + secrets.token_hex(12)
    license_key = "avaluma-license-" + secrets.token_hex(12)
    moto_port = free_port()
    moto = python_module(
        "moto",
        "moto.server",
        ["-H", "127.0.0.1", "-p", str(moto_port)],
        ready=tcp_ready("127.0.0.1", moto_port),
        log_dir=workdir / "logs",
    )
    with (
        moto,
        local_stack(
            workdir,
            persistent=True,
            api_secret=api_secret,
            license_key=license_key,
            broker=broker,
        ) as stack,
    ):
        saved = dict(os.environ)
        os.environ.update({**stack.env(), **WORKER_ENV})
        get_settings.cache_clear()
        clips = workdir / "clips"
        clips.mkdir(exist_ok=True)
        try:
            yield FaultLab(stack, f"http://127.0.0.1:{moto_port}", clips)
        finally:
            os.environ.clear()
            os.environ.update(saved)
            get_settings.cache_clear()


def leaked_secrets(lab: FaultLab) -> list[str]:
    """Places where the stack's LiveKit secret or license key appear: worker logs, job
    records, results and events. Must be empty."""
    needles = [lab.stack.api_secret, lab.stack.license_key]
    found = []
    for log in (lab.stack.workdir / "logs").glob("worker-*.log"):
        text = log.read_text(errors="replace")
        found += [f"{log.name}" for n in needles if n in text]
    for key in lab.redis.scan_iter("avatarq:*"):
        kind = lab.redis.type(key).decode()
        values: list[bytes] = []
        if kind == "string":
            values = [lab.redis.get(key) or b""]
        elif kind == "list":
            values = lab.redis.lrange(key, 0, -1)
        elif kind == "stream":
            values = [json.dumps({k.decode(): v.decode() for k, v in f.items()}).encode()
                      for _id, f in lab.redis.xrange(key)]  # fmt: skip
        elif kind == "hash":
            values = list(lab.redis.hgetall(key).values())
        for v in values:
            found += [key.decode() for n in needles if n.encode() in v]
    for key in lab.redis.scan_iter("celery-task-meta-*"):
        value = lab.redis.get(key) or b""
        found += [key.decode() for n in needles if n.encode() in value]
    return found
