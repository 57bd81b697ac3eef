"""Names shared by the worker (which writes) and producers (which read): events and records.

Backend services read job events from the Redis stream `avatarq:events` (all jobs) or
`avatarq:events:{job_id}` (one job); each entry has fields `event`, `job_id`, `ts` and
`data` (a JSON object). The terminal state of a job is kept under `avatarq:job:{job_id}`.
"""

from __future__ import annotations

from enum import StrEnum


class Event(StrEnum):
    STARTED = "job.started"
    AVATAR_READY = "job.avatar_ready"
    PROGRESS = "job.progress"
    COMPLETED = "job.completed"
    FAILED = "job.failed"
    CANCELLED = "job.cancelled"
    UNCONFIRMED = "job.unconfirmed"
    #: No session slot of its avatar server is free: the job waits its turn (not an attempt).
    WAITING_FOR_AVATAR = "job.waiting_for_avatar"
    RETRYING = "job.retrying"


class Status(StrEnum):
    UNKNOWN = "unknown"  # never enqueued (or its record expired)
    QUEUED = "queued"
    WAITING_FOR_AVATAR = "waiting_for_avatar"  # in line for a session of its avatar server
    PLAYING = "playing"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    #: Streamed in full to a listening avatar that never reported playing it: not replayed.
    UNCONFIRMED = "unconfirmed"


TERMINAL = frozenset({Status.COMPLETED, Status.FAILED, Status.CANCELLED, Status.UNCONFIRMED})

#: How long records and per-job event streams are kept (they must outlive redelivery).
RECORD_TTL_S = 30 * 24 * 3600


#: The event that announces each terminal state; the last event of a job's stream.
TERMINAL_EVENT = {
    Status.COMPLETED: Event.COMPLETED,
    Status.FAILED: Event.FAILED,
    Status.CANCELLED: Event.CANCELLED,
    Status.UNCONFIRMED: Event.UNCONFIRMED,
}
TERMINAL_EVENTS = frozenset(TERMINAL_EVENT.values())


def job_events_key(job_id: str) -> str:
    return f"avatarq:events:{job_id}"


def job_record_key(job_id: str) -> str:
    return f"avatarq:job:{job_id}"


def job_enqueued_key(job_id: str) -> str:
    """Hash {ts, room, job}: set once at enqueue, so the same job id is never sent twice."""
    return f"avatarq:enqueued:{job_id}"


def job_lease_key(job_id: str) -> str:
    """The worker playing the job (expires unless renewed, so a dead worker lets go)."""
    return f"avatarq:lease:{job_id}"


def job_waiting_key(job_id: str) -> str:
    """JSON {server, place, sessions, quota} while the job waits for an avatar session."""
    return f"avatarq:waiting:{job_id}"


def avatar_quota_key(server: str, part: str) -> str:
    """The session quota of avatar server `server` (tasks/quota.py): `sessions` (zset holder →
    lease expiry ms), `waiting` (zset job → first wait ms), `waiting-seen`, `cap`."""
    return f"avatarq:avatar:{server}:{part}"


def job_cancel_key(job_id: str) -> str:
    return f"avatarq:cancel:{job_id}"


def job_attempts_key(job_id: str) -> str:
    return f"avatarq:attempts:{job_id}"


def room_order_key(room: str) -> str:
    """List of the room's unfinished job ids in enqueue order: only the head may play."""
    return f"avatarq:room:{room}"


def room_holder_key(room: str) -> str:
    """The job playing in the room right now (expires with its lease): no other job of the
    room may start while it is live, even if the room's order was lost."""
    return f"avatarq:room-holder:{room}"


def job_avatar_key(job_id: str) -> str:
    """Hash {server, session_id}: the avatar session a playing job started, so recovery can
    stop it if the job's worker dies."""
    return f"avatarq:avatar:{job_id}"


#: Set of the ids of worker processes that announced themselves (tasks/recovery.py).
WORKERS_KEY = "avatarq:workers"


def worker_heartbeat_key(worker_id: str) -> str:
    """Present while the worker process is alive (expires with the lease TTL)."""
    return f"avatarq:worker:{worker_id}"


def worker_held_key(worker_id: str) -> str:
    """Hash job id -> payload JSON: the deliveries the worker process holds right now."""
    return f"avatarq:held:{worker_id}"


#: Jobs that exhausted their retries, newest first (JSON: job, reason, error, attempts, ts).
DEAD_LETTER_KEY = "avatarq:dead"
