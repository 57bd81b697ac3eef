"""Stopping a job that is playing: cancellation, hand-back at shutdown, a lost room.

A `JobControl` is the one place a playing job looks to know whether to stop and why. The
lease watch (tasks/hooks.py) sets it from Redis (cancel requests, take-over) and from the
process's shutdown state; the link sets it when the room or the avatar is lost for good.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field
from enum import StrEnum

from avatarq.errors import LeaseUnconfirmed

#: How long a stream holds its audio for a lease it cannot confirm before it ends the segment
#: (the avatar's receiver ends one after 10 s without audio; it still holds the lead).
LEASE_PATIENCE_S = 5.0
_ADMIT_POLL_S = 0.02


class StopReason(StrEnum):
    CANCELLED = "cancelled"
    HANDED_BACK = "handed_back"  # the worker is shutting down; another worker plays it
    ROOM_LOST = "room_lost"
    AVATAR_LEFT = "avatar_left"


#: Set once the worker's shutdown grace period is over: playing jobs are handed back.
HAND_BACK = threading.Event()
#: Set as soon as the worker starts shutting down: a room's next job is handed back, not
#: played (tasks/render.py).
LEAVING = threading.Event()


@dataclass
class JobControl:
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    reason: StopReason | None = None
    #: The stop came because another delivery of the job holds its lease now: it plays there.
    taken_over: bool = False
    #: When the stop was asked for (time.monotonic()).
    requested_at: float | None = None
    #: How far into the source (seconds) the stream may send: moved on by each lease tick
    #: that confirmed this attempt still owns the job (tasks/hooks.py LeaseWatch), so a
    #: worker cut off from the ledger stops soon after the last thing it could record.
    #: None: nothing fences the stream.
    granted: float | None = None
    #: Set when the stream reaches `granted` with audio due: the lease watch ticks at once
    #: rather than at its next interval (the lead sends more than the fence allows at a
    #: segment's start, and must not wait a tick for it).
    fenced: asyncio.Event = field(default_factory=asyncio.Event)

    def request_stop(self, reason: StopReason, *, taken_over: bool = False) -> None:
        if self.reason is None:
            self.reason = reason
            self.taken_over = taken_over
            self.requested_at = time.monotonic()
        self.stop.set()

    def grant(self, position: float) -> None:
        if self.granted is None or position > self.granted:
            self.granted = position

    async def admit(self, until: float, *, patience_s: float = LEASE_PATIENCE_S) -> None:
        """Wait until the stream may send up to `until` (source seconds) or is stopped;
        past `patience_s`, `LeaseUnconfirmed`."""
        for i in range(int(patience_s / _ADMIT_POLL_S) + 1):
            if self.stop.is_set() or self.granted is None or until <= self.granted:
                return
            if i == 0:  # once per wait: a Redis outage must not make the watch spin
                self.fenced.set()
            await asyncio.sleep(_ADMIT_POLL_S)
        raise LeaseUnconfirmed(
            f"held the audio {patience_s:g}s without confirming the job's lease: the segment "
            "was ended at the last sample sent"
        )


class Interrupted(Exception):  # noqa: N818 - a control-flow signal, not an error
    """The job stopped before its end on request; carries how far it got."""

    def __init__(
        self,
        reason: StopReason,
        *,
        stopped_at: float,
        seconds_streamed: float,
        playback_position: float | None,
    ) -> None:
        super().__init__(f"{reason.value} after {seconds_streamed:.2f}s streamed")
        self.reason = reason
        self.stopped_at = stopped_at
        self.seconds_streamed = seconds_streamed
        self.playback_position = playback_position
