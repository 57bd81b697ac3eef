"""What one play of a job is given: its context, the segment its hooks see, the hook points."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from avatarq.budget import Budget
from avatarq.jobs import Job
from avatarq.results import Recording, Timestamps
from tasks.control import JobControl
from tasks.link.pacing import Pacer
from tasks.link.types import Captions
from tasks.seams import JobLedger, Reporter


@dataclass
class PlayContext:
    """One delivery's play, built once by its run (tasks/jobrun.py) and given to its hooks
    and its playback: the job, its limits, who it reports to, what stops it, its milestones."""

    job: Job
    budget: Budget
    token: str
    control: JobControl
    ledger: JobLedger
    reporter: Reporter
    attempt: int = 1
    #: Where in the source this attempt starts: where earlier ones got to, less overlap.
    start_at: float = 0.0
    timestamps: Timestamps = field(default_factory=lambda: Timestamps(picked=time.time()))
    hooks: Sequence[JobHook] = ()
    #: Set by the recording hook once the attempt's recording is stored; the run puts it in
    #: the job's result.
    recording: Recording | None = None


@dataclass
class Segment:
    """The stream a hook sees: whose it is, how fast it goes, how long it is, and where in
    the source it starts (a resumed job's seconds before `start_at` are not sent again)."""

    job: Job
    bytes_per_second: int
    duration: float | None
    pacer: Pacer
    #: Where in the source this segment starts (seconds): a resumed attempt's checkpoint.
    start_at: float = 0.0
    #: Where captions of the segment are shown (the room's `lk.transcription`), if anywhere.
    captions: Captions | None = None

    def played_position(self, sent_bytes: int) -> float:
        """How far into the source the avatar has provably played: what went out, less the
        lead it may still hold (never before where this segment started)."""
        return self.start_at + max(0.0, sent_bytes / self.bytes_per_second - self.pacer.lead)


class JobHook:
    """Called at fixed points of a play; every method is optional. None of them decides how
    the job ends: they watch and record.

        on_claimed        the job holds its lease and its room's head: it is about to play
        on_link_ready     the avatar listens; awaited before the first byte (keep it short)
        on_stream_start   the first byte is about to go out
        on_chunk_sent     after every write (keep it cheap: it runs in the send loop)
        on_stream_end     the last byte went out, or the stream stopped
        on_released       the play is over, whatever its outcome (always after on_claimed)
    """

    async def on_claimed(self) -> None:
        return None

    async def on_link_ready(self) -> None:
        return None

    def on_stream_start(self, segment: Segment) -> None:
        return None

    def on_chunk_sent(self, segment: Segment, sent: int) -> None:
        return None

    def on_stream_end(self, segment: Segment) -> None:
        return None

    async def on_released(self) -> None:
        return None


#: Makes a hook for one run.
HookFactory = Callable[[PlayContext], JobHook]
