"""The ledger's words: what a worker is told about a job (claims, checkpoints, the end it
recorded) and the entries its rooms' lanes keep. Standard library only, so the job's state
machine and its fakes use them without Redis."""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import StrEnum
from typing import Any


class Claim(StrEnum):
    OK = "ok"  # play it now
    DONE = "done"  # already ended: never play again
    CANCELLED = "cancelled"  # cancelled before it started
    BUSY = "busy"  # another worker is playing this very job: a duplicate delivery
    WAIT = "wait"  # not its room's turn yet: try again later
    PARKED = "parked"  # not its room's turn: kept in the room's lane, handed on in its turn


@dataclass(frozen=True)
class Progress:
    """Where a playing attempt is in the job's source (seconds): what a watch tick records."""

    attempt: int
    started_at: float
    #: What the avatar has provably played (sent, less the buffer it may still hold).
    position: float
    #: What was sent: what it will have played once its buffer plays out.
    sent: float


@dataclass(frozen=True)
class Span:
    """The part of the source one attempt played."""

    attempt: int
    started_at: float
    ended_at: float


@dataclass(frozen=True)
class Checkpoint:
    #: How far the avatar has provably played the source (the last attempt's tick).
    position: float = 0.0
    #: How far that attempt had sent.
    sent: float = 0.0
    #: The attempt's worker died with nothing clearing the avatar's buffer: it played out.
    played_out: bool = False
    spans: tuple[Span, ...] = ()

    @property
    def heard(self) -> float:
        """Where the listener's hearing of the source stopped: where to resume."""
        return self.sent if self.played_out else self.position

    @property
    def heard_twice_s(self) -> float:
        """Seconds of the source that more than one attempt played."""
        twice, reached = 0.0, 0.0
        for span in sorted(self.spans, key=lambda s: s.attempt):
            twice += max(0.0, min(reached, span.ended_at) - span.started_at)
            reached = max(reached, span.ended_at)
        return twice


@dataclass(frozen=True)
class Handoff:
    """A parked job handed to this worker process by its room's previous job."""

    task_id: str
    payload: Any


@dataclass(frozen=True)
class Parked:
    """A job a worker process parked: kept in memory until it ends or plays elsewhere."""

    job_id: str
    room: str
    payload: Any


@dataclass(frozen=True)
class Finish:
    #: True when this call recorded the end; False when the job had ended already.
    recorded: bool
    #: False when another delivery holds the job's lease: this attempt was taken over.
    ours: bool = True
    #: The room's next job, now this worker's to play.
    next: Handoff | None = None


def job_id_of(payload: Any, task_id: str) -> str:
    """The job's id: its own, else the Celery task id, which every redelivery and retry of
    the message keeps (a fresh random id per delivery would never reach its room's head)."""
    if isinstance(payload, dict) and isinstance(payload.get("job_id"), str) and payload["job_id"]:
        return str(payload["job_id"])
    return task_id


def lane_entry(task_id: str, payload: Any) -> str:
    return json.dumps({"task_id": task_id, "payload": json.dumps(payload)})


def handoff_of(entry: bytes | str) -> Handoff:
    """A lane entry (`lane_entry`) read back."""
    fields = json.loads(entry)
    return Handoff(str(fields["task_id"]), json.loads(fields["payload"]))
