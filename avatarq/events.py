"""Names shared by the worker (which writes) and producers (which read): events and statuses.

Backend services read job events from the Redis stream `AVATARQ_EVENTS_STREAM` (all jobs) or
a job's own (`job_events_key`, avatarq/ledger/keys.py); each entry has fields `event`,
`job_id`, `ts` and `data` (a JSON object).
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

#: The event that announces each terminal state; the last event of a job's stream.
TERMINAL_EVENT = {
    Status.COMPLETED: Event.COMPLETED,
    Status.FAILED: Event.FAILED,
    Status.CANCELLED: Event.CANCELLED,
    Status.UNCONFIRMED: Event.UNCONFIRMED,
}
TERMINAL_EVENTS = frozenset(TERMINAL_EVENT.values())
