"""The fault scenarios: each enqueues jobs, injects one fault into the running stack, waits
until every job has ended and returns what the lab observed (`Run`), judging nothing itself.

Every scenario runs with default settings, as a user has them (redis-server's own persistence
included); the few that change one say why, next to it."""

from __future__ import annotations

import contextlib
import random
import secrets
import signal
import subprocess
import time
from collections.abc import Callable

from avatarq.ledger.keys import room_order_key
from avatarq_dev.faults.avatar_death import avatar_server_dies
from avatarq_dev.faults.cutoff import worker_cut_off_from_redis
from avatarq_dev.faults.lab import RECOVERY_GOAL_S, SOURCE_BPS, FaultLab, Run, poll
from avatarq_dev.faults.origin import Darkness, slow_origin
from avatarq_dev.processes import ManagedProcess

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
BUCKET = "faults"
#: How long a duplicate delivery is watched for: it would have started by then.
DUPLICATE_WATCH_S = 2.0


def _room(name: str) -> str:
    return f"{name}-{secrets.token_hex(3)}"


def _exits(proc: ManagedProcess, timeout: float) -> bool:
    assert proc.proc is not None
    try:
        proc.proc.wait(timeout)
    except subprocess.TimeoutExpired:
        return False
    return True


def sigkill_mid_stream(lab: FaultLab) -> Run:
    """SIGKILL the worker playing a job, two more jobs of its room queued behind it: its
    heartbeat and lease lapse (15 s), a live worker's sweep publishes it again, and it plays in
    full once on that worker, long before the broker's visibility timeout; the room's next
    jobs follow in order."""
    room = _room("kill")
    with lab.workers(1, concurrency=1) as (victim,):
        job = lab.enqueue(room, 6.0)
        lab.wait_streamed(job, 1.0)
        with lab.workers(1):
            behind = [lab.enqueue(room, 1.0) for _ in range(2)]
            killed_at = time.time()
            victim.signal(signal.SIGKILL)
            recover = lab.started_attempt(job, 2, timeout=RECOVERY_GOAL_S) - killed_at
            records = lab.wait([job, *behind])
    return lab.observe(
        "SIGKILL worker mid-stream",
        [job, *behind],
        records,
        recover_s=recover,
        room=room,
        killed_at=killed_at,
    )


def sigkill_holding_waiting_jobs(lab: FaultLab) -> Run:
    """SIGKILL a worker that took only waiting jobs (their room plays elsewhere): they parked
    in the room's lane, are reported queued, not playing, and the worker playing the room
    plays them in order soon after."""
    room = _room("strand")
    with lab.workers(1, concurrency=1):
        head = lab.enqueue(room, 5.0)
        lab.wait_event(head, "job.avatar_ready")
        with lab.workers(1) as (victim,):
            waiting = [lab.enqueue(room, 1.0) for _ in range(2)]
            lab.wait_parked(waiting)  # taken by the victim, parked behind the head
            statuses = [lab.status(j).get("status") for j in waiting]
            killed_at = time.time()
            victim.signal(signal.SIGKILL)
            records = lab.wait([head, *waiting])
    run = lab.observe(
        "SIGKILL worker holding only waiting jobs",
        [head, *waiting],
        records,
        room=room,
        killed_at=killed_at,
        statuses_before_kill=statuses,
    )
    ends = [run.ended_at(j) for j in waiting]
    if all(t is not None for t in ends):
        run.recover_s = max(t for t in ends if t is not None) - killed_at
    return run


def sigkill_during_avatar_start(lab: FaultLab) -> Run:
    """SIGKILL the worker while its avatar session starts (the avatar accepted, not joined):
    recovery stops that orphaned session and plays the job on a live worker."""
    room = _room("killstart")
    with lab.workers(1) as (victim,):
        lab.avatar_faults(join=False)
        try:
            job = lab.enqueue(room, 2.0)
            lab.wait_avatar_started(job)  # past start-avatar, waiting for the avatar to join
            killed_at = time.time()
            victim.signal(signal.SIGKILL)
        finally:
            lab.reset_avatar()
    with lab.workers(1):
        records = lab.wait([job])
    run = lab.observe(
        "SIGKILL worker during avatar start", [job], records, room=room, killed_at=killed_at
    )
    if (ended := run.ended_at(job)) is not None:
        run.recover_s = ended - killed_at
    return run


def sigterm_mid_stream(lab: FaultLab) -> Run:
    """SIGTERM with a 1 s grace: the playing job is handed back and played from the start by
    another worker; the stopping worker exits."""
    # Non-default grace: a hand-back needs a job longer than the grace (default 30 s).
    with lab.workers(1, AVATARQ_SHUTDOWN_GRACE="1") as (victim,):
        job = lab.enqueue(_room("term"), 6.0)
        lab.wait_streamed(job, 1.0)
        with lab.workers(1):
            term_at = time.time()
            victim.signal(signal.SIGTERM)
            recover = lab.started_attempt(job, 2) - term_at
            records = lab.wait([job])
            exited = victim.proc is not None and _exits(victim, 20.0)
    run = lab.observe(
        "SIGTERM worker mid-stream (grace 1 s)", [job], records, recover_s=recover, exited=exited
    )
    rec = records.get(job, {})
    run.notes.append(f"ended {rec.get('status')} on attempt {rec.get('attempt')}")
    run.notes += [
        f"{e['event']} attempt {e.get('attempt')}: {e.get('reason')} {e.get('error', '')}"
        for e in run.events[job]
        if e["event"] in ("job.retrying", "job.started")
    ]
    return run


def sigterm_within_grace(lab: FaultLab) -> Run:
    """SIGTERM with a grace longer than the job: it finishes where it was."""
    with lab.workers(1) as (worker,):  # the default grace (30 s) outlasts the job
        job = lab.enqueue(_room("grace"), 3.0)
        lab.wait_event(job, "job.avatar_ready")
        worker.signal(signal.SIGTERM)
        records = lab.wait([job])
        exited = _exits(worker, 30.0)
    return lab.observe("SIGTERM within the grace period", [job], records, exited=exited)


def _redis_fault(lab: FaultLab, name: str, *, crash: bool) -> Run:
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
        lab.wait_streamed(ids[0], 1.0)
        lab.wait_streamed(ids[-1], 1.0)
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
    run = lab.observe(name, ids, records, worker_alive=alive, worker_crashed=crashed)
    ends = [t for t in (run.ended_at(i) for i in ids) if t is not None and t > fault_at]
    run.recover_s = min(ends) - fault_at if ends else None
    return run


def redis_restart(lab: FaultLab) -> Run:
    return _redis_fault(lab, "Redis restart, graceful (1 playing, 3 held)", crash=False)


def redis_crash(lab: FaultLab) -> Run:
    return _redis_fault(lab, "Redis crash, SIGKILL (1 playing, 3 held)", crash=True)


def livekit_restart(lab: FaultLab) -> Run:
    """Kill the LiveKit server mid-stream and start it again on the same port."""
    with lab.workers(1):
        job = lab.enqueue(_room("lk"), 6.0)
        lab.wait_streamed(job, 1.5)
        fault_at = time.time()
        lab.stack.livekit.signal(signal.SIGKILL)
        assert lab.stack.livekit.proc is not None
        lab.stack.livekit.proc.wait(10)
        lab.stack.livekit.start()
        lab.revive_avatar(watch_s=3.0)
        records = lab.wait([job])
    run = lab.observe("LiveKit server restart mid-stream", [job], records)
    if (end := run.ended_at(job)) is not None:
        run.recover_s = end - fault_at
    return run


def avatar_500_then_200(lab: FaultLab) -> Run:
    with lab.workers(1):
        lab.avatar_faults(fail_next_starts=1, fail_status=500)
        job = lab.enqueue(_room("a500"), 1.0)
        records = lab.wait([job])
    return lab.observe("avatar server 500, then 200", [job], records)


def avatar_never_joins(lab: FaultLab) -> Run:
    with lab.workers(1, env=FAST_FAILURE_ENV):  # retried to exhaustion: minutes by default
        lab.avatar_faults(join=False)
        try:
            job = lab.enqueue(_room("nojoin"), 1.0)
            records = lab.wait([job])
        finally:
            lab.reset_avatar()
    return lab.observe("avatar never joins", [job], records, dead_lettered=lab.dead_lettered(job))


def avatar_leaves_mid_stream(lab: FaultLab) -> Run:
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
        dead = lab.dead_lettered(job)
        retry_dead(job)
        records = lab.wait([job])
    return lab.observe(
        "avatar leaves mid-stream", [job], records, first_record=first, dead_lettered=dead
    )


def s3_object_missing(lab: FaultLab) -> Run:
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
    return lab.observe("S3 object missing", [missing, present], records)


def corrupt_audio(lab: FaultLab) -> Run:
    bad = lab.clips / "corrupt.mp3"
    # Fixed noise: random bytes may happen to look like a format ffmpeg knows (and refuses as
    # not allowed, `format_not_allowed`); this seed's are nothing at all (`invalid_audio`).
    bad.write_bytes(random.Random(0).randbytes(20_000))
    with lab.workers(1):
        job = lab.enqueue(_room("corrupt"), 1.0, source=str(bad))
        records = lab.wait([job])
    return lab.observe("corrupt audio", [job], records)


def same_room_20(lab: FaultLab) -> Run:
    """20 jobs for one room at once, 2 workers × 4 slots: one at a time, in enqueue order."""
    room = _room("busy")
    with lab.workers(2, concurrency=4):
        ids = [lab.enqueue(room, 0.5) for _ in range(20)]
        records = lab.wait(ids, timeout=240)
    return lab.observe("20 concurrent jobs, same room", ids, records, room=room)


def same_job_id_5x(lab: FaultLab) -> Run:
    with lab.workers(1):
        job_id = f"dup-{secrets.token_hex(4)}"
        for _ in range(5):
            lab.enqueue(_room("dup"), 1.0, job_id=job_id)
        records = lab.wait([job_id])
        # Watched a while: a second delivery, if any, would start within it.
        poll(
            lambda: sum(s.job_id == job_id for s in lab.segments()) > 1,
            timeout=DUPLICATE_WATCH_S,
        )
    return lab.observe("same job id enqueued 5 times", [job_id], records)


def cancellation(lab: FaultLab) -> Run:
    """Cancel a queued job and a playing one (it must stop within 0.5 s)."""
    from producers import cancel

    room = _room("cancel")
    with lab.workers(1):
        playing = lab.enqueue(room, 6.0)
        queued = lab.enqueue(room, 1.0)
        lab.wait_event(playing, "job.avatar_ready")
        was_queued = cancel(queued)
        lab.wait_streamed(playing, 1.5)
        asked_at = time.time()
        was_playing = cancel(playing)
        records = lab.wait([playing, queued])
    stopped_in = (records.get(playing, {}).get("stopped_at") or 1e12) - asked_at
    return lab.observe(
        "cancel while queued and while playing",
        [playing, queued],
        records,
        recover_s=stopped_in,
        cancel_answers=(was_queued, was_playing),
    )


def warm_session_elsewhere(lab: FaultLab) -> Run:
    """The next job of a room lands on another worker than the one keeping the room's avatar
    warm: that worker lets its idle session go first, so the two never collide."""
    room = _room("warm")
    with lab.workers(1, concurrency=1, AVATARQ_WARM_IDLE="30"):
        first = lab.enqueue(room, 1.0)
        lab.wait([first])
        busy = lab.enqueue(_room("busy"), 4.0)  # the holder's only slot is taken...
        lab.wait_event(busy, "job.avatar_ready")
        with lab.workers(1, AVATARQ_WARM_IDLE="30"):
            second = lab.enqueue(room, 1.0)  # ...so another worker plays this one
            records = lab.wait([first, busy, second])
    return lab.observe("next job of a warm room on another worker", [first, busy, second], records)


def raw_payload_without_job_id(lab: FaultLab) -> Run:
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
    return lab.observe(
        "raw send_task without job_id, busy room", [head, raw], records, room_order_left=order_left
    )


def garbage_with_another_jobs_id(lab: FaultLab) -> Run:
    """A message that fails validation names a queued job's id: it is dropped, and the job it
    names still plays."""
    room = _room("garbage")
    with lab.workers(1):
        head = lab.enqueue(room, 3.0)
        victim = lab.enqueue(room, 1.0)
        lab.wait_event(head, "job.avatar_ready")
        lab.send_raw({"job_id": victim, "room": 42, "bogus": True})
        records = lab.wait([head, victim])
    return lab.observe("invalid message carrying another job's id", [head, victim], records)


def slow_origin_goes_dark(lab: FaultLab) -> Run:
    """A 20 s clip from an origin serving at 2x real time that sends nothing for 25 s at 40 %:
    the run-ahead buffer drains, the segment is ended cleanly (source_stalled) before the
    avatar's idle timeout could cut it, and a retry plays the rest once data flows."""
    room = _room("dark")
    clip = lab.clip(20.0)
    dark = Darkness(at_byte=int(0.4 * (clip.stat().st_size)), seconds=25.0)
    origin = slow_origin(clip, bytes_per_second=2 * SOURCE_BPS, dark=dark)
    with origin as url, lab.workers(1, env={"AVATARQ_ALLOW_PRIVATE_SOURCES": "1"}):
        job = lab.enqueue(room, 20.0, source=url)
        records = lab.wait([job], timeout=180.0)
    stalls = [
        e
        for e in lab.events(job)
        if e["event"] == "job.retrying" and e.get("reason") == "source_stalled"
    ]
    return lab.observe(
        "slow origin (2x) dark 25 s at 40 %", [job], records, room=room, stalls=len(stalls)
    )


SCENARIOS: dict[str, Callable[[FaultLab], Run]] = {
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
        slow_origin_goes_dark,
        worker_cut_off_from_redis,
        avatar_server_dies,
    )
}
