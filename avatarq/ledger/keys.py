"""Every Redis key avatarq uses, and how long each lives. Only the ledger package spells them.

Per job: its terminal record, enqueue marker, lease, cancel request, attempt counter, event
stream, waiting note and avatar session note. Per room: its order, holder and agent. Per worker
process: its heartbeat, held deliveries and owed webhooks. Per avatar server: its session
quota. Then the warm sessions' markers, the unseen jobs, the dead-letter list and
celery-redbeat's keys.
"""

from __future__ import annotations

from typing import Literal

#: How long records and per-job event streams are kept (they must outlive redelivery).
RECORD_TTL_S = 30 * 24 * 3600
#: A lease outlives a few missed renewals, yet a dead worker's job is free again soon.
LEASE_TTL_S = 15.0
#: How long an avatar session's note is kept if its job never ends (the job's record keeps
#: nothing of it; a finished job drops the note).
AVATAR_NOTE_TTL_S = 24 * 3600
#: A worker process's heartbeat expires this long after its last renewal: before its leases
#: (`LEASE_TTL_S`), which still say which of its jobs were playing when a sweep takes them.
HEARTBEAT_TTL_S = 10.0
#: A request that an idle warm session let go lives this long if nobody acts on it.
WARM_RELEASE_TTL_S = 30

#: The default stream of every job's events (`AVATARQ_EVENTS_STREAM`).
EVENTS_STREAM = "avatarq:events"
#: Set of the ids of worker processes that announced themselves (tasks/recovery.py).
WORKERS_KEY = "avatarq:workers"
#: Set of the rooms whose lane holds parked jobs (`room_lane_key`).
LANES_KEY = "avatarq:lanes"
#: Zset job id -> when its message last went into the broker (its registration, or a send
#: again by tasks/recovery.py), for each registered job no worker has claimed yet.
UNSEEN_KEY = "avatarq:unseen"
#: Jobs that exhausted their retries, newest first (JSON: job, reason, error, attempts, ts).
DEAD_LETTER_KEY = "avatarq:dead"
#: celery-redbeat's keys (each announcement's last fire) and the lock a running beat holds.
BEAT_KEY_PREFIX = "avatarq:beat:"
BEAT_LOCK_KEY = "avatarq:beat:lock"


def job_events_key(job_id: str) -> str:
    return f"avatarq:events:{job_id}"


def job_record_key(job_id: str) -> str:
    return f"avatarq:job:{job_id}"


def job_enqueued_key(job_id: str) -> str:
    """Hash {ts, room, job}: set once at enqueue, so the same job id is never sent twice;
    `seen` and `rejoined` stamped by claims (claim.lua)."""
    return f"avatarq:enqueued:{job_id}"


def job_lease_key(job_id: str) -> str:
    """The worker playing the job (expires unless renewed, so a dead worker lets go)."""
    return f"avatarq:lease:{job_id}"


def job_waiting_key(job_id: str) -> str:
    """JSON {server, place, sessions, quota} while the job waits for an avatar session."""
    return f"avatarq:waiting:{job_id}"


def job_cancel_key(job_id: str) -> str:
    return f"avatarq:cancel:{job_id}"


def job_attempts_key(job_id: str) -> str:
    return f"avatarq:attempts:{job_id}"


def job_checkpoint_key(job_id: str) -> str:
    """Hash {position, <attempt>: "start:end"}: how far the avatar has provably played the
    job's source (a redelivery resumes there), and each attempt's span of it."""
    return f"avatarq:checkpoint:{job_id}"


def job_avatar_key(job_id: str) -> str:
    """Hash {server, session_id}: the avatar session a playing job started, so recovery can
    stop it if the job's worker dies."""
    return f"avatarq:avatar:{job_id}"


def room_order_key(room: str) -> str:
    """List of the room's unfinished job ids in enqueue order: only the head may play."""
    return f"avatarq:room:{room}"


def room_lane_key(room: str) -> str:
    """Hash job id -> JSON {task_id, payload}: the room's jobs parked behind its playing one,
    whose message was acknowledged; the room's playing job hands each on when it ends."""
    return f"avatarq:lane:{room}"


def room_holder_key(room: str) -> str:
    """The job playing in the room right now (expires with its lease): no other job of the
    room may start while it is live, even if the room's order was lost."""
    return f"avatarq:room-holder:{room}"


def room_agent_key(room: str) -> str:
    """The conversational agent holding the room's avatar (avatarq_agents): its process id,
    expiring unless renewed. The room's jobs park in its lane and that agent plays them."""
    return f"avatarq:room-agent:{room}"


QuotaPart = Literal["sessions", "waiting", "waiting-seen", "cap", "limits", "freed"]


def avatar_quota_key(server: str, part: QuotaPart) -> str:
    """The session quota of avatar server `server` (tasks/link/quota.py): `sessions` (zset holder →
    lease expiry ms), `waiting` (zset job → first wait ms), `waiting-seen` (zset job → last
    poll ms), `cap` (the quota shrunk after a 429, with a TTL), `limits` (zset: the quota a
    live worker process is configured with → when its heartbeat's word for it lapses, ms),
    `freed` (a pub/sub channel: a slot was released)."""
    # Its own prefix: under `avatarq:avatar:` a job id such as `default:sessions` (a valid id)
    # would name this key.
    return f"avatarq:avatar-quota:{server}:{part}"


def effective_quota(configured: int, cap: bytes | None, limits: list[bytes]) -> int:
    """A server's quota as slots_acquire.lua keeps to it: the configured one, or less while
    a 429's cap lasts or a live worker process is configured with less (never below one)."""
    return max(1, min([configured, *(int(n) for n in ([cap] if cap else []) + limits)]))


def worker_heartbeat_key(worker_id: str) -> str:
    """Present while the worker process is alive (expires after `HEARTBEAT_TTL_S`)."""
    return f"avatarq:worker:{worker_id}"


def worker_held_key(worker_id: str) -> str:
    """Hash job id -> payload JSON: the deliveries the worker process holds right now."""
    return f"avatarq:held:{worker_id}"


def worker_webhooks_key(worker_id: str) -> str:
    """Hash job id -> webhook URL: the webhooks of jobs the worker process recorded the end
    of and has not delivered yet (recovery delivers a dead one's)."""
    return f"avatarq:webhooks:{worker_id}"


def warm_holder_key(room: str, avatar: str) -> str:
    """The worker process holding an idle warm session of `avatar` in `room` (tasks/link/)."""
    return f"avatarq:warm:{room}:{avatar}"


def warm_release_key(room: str, avatar: str) -> str:
    """A request that the holder of that idle session let it go (a cold start needs it)."""
    return f"avatarq:warm-release:{room}:{avatar}"
