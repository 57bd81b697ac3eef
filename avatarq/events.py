"""Event names, statuses and payloads: the worker writes them, producers read them back.

Each stream entry (docs/usage.md) has `event`, `job_id`, `ts` and `data`, whose type depends
on the event (`parse_event(event, data)` reads it back):

    job.started             JobStarted        room, avatar_id, attempt
    job.waiting_for_avatar  WaitingForAvatar  server, place (1 = next), sessions, quota
    job.avatar_ready        AvatarReady       session_id, warm
    job.progress            Progress          seconds_streamed, total_seconds
    job.retrying            Retrying          reason, attempt, retry_in, error (when one)
    job.completed, job.unconfirmed, job.failed, job.cancelled
                            the job's result (avatarq/results.py JobResult)"""

from __future__ import annotations

from enum import StrEnum
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict

from avatarq.results import Cancelled, Failed, Played, parse_result


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


class _Payload(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    #: The event this payload is the `data` of.
    event: ClassVar[Event]
    #: Left out of `data` when None.
    _OPTIONAL: ClassVar[frozenset[str]] = frozenset()

    def data(self) -> dict[str, Any]:
        """The JSON-safe dict written as the event's `data`."""
        dumped = self.model_dump(mode="json")
        return {k: v for k, v in dumped.items() if not (v is None and k in self._OPTIONAL)}


class JobStarted(_Payload):
    event = Event.STARTED
    room: str
    avatar_id: str
    attempt: int


class WaitingForAvatar(_Payload):
    """No session slot of the avatar server is free; `place` 1 is next in line."""

    event = Event.WAITING_FOR_AVATAR
    server: str
    place: int
    sessions: int
    quota: int


class AvatarReady(_Payload):
    event = Event.AVATAR_READY
    session_id: str | None
    warm: bool


class Progress(_Payload):
    event = Event.PROGRESS
    seconds_streamed: float
    total_seconds: float | None


class Retrying(_Payload):
    """The job goes back to the queue and plays again from the start in `retry_in` seconds."""

    event = Event.RETRYING
    _OPTIONAL: ClassVar[frozenset[str]] = frozenset({"error"})
    reason: str
    attempt: int
    retry_in: float
    error: str | None = None


EventPayload = JobStarted | WaitingForAvatar | AvatarReady | Progress | Retrying
_PAYLOADS: dict[str, type[EventPayload]] = {
    cls.event.value: cls for cls in (JobStarted, WaitingForAvatar, AvatarReady, Progress, Retrying)
}


def parse_event(event: str, data: dict[str, Any]) -> EventPayload | Played | Failed | Cancelled:
    """An event's `data` read back as its type; pydantic's ValidationError when it is not
    one, ValueError for an event name this version does not know."""
    if event in TERMINAL_EVENTS:
        return parse_result(data)
    try:
        payload = _PAYLOADS[event]
    except KeyError:
        raise ValueError(f"unknown event {event!r}") from None
    return payload.model_validate(data)
