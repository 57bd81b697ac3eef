"""`CaptionCues`: a job's transcript shown in the room, each cue as the avatar plays its start.

The avatar plays byte b of a segment at `pacer.t0 + b / bytes_per_second` (the sender keeps
the lead ahead of that), or from when it reports its playback start; cues are timed on that
clock, in a task of their own so that the send loop never waits for them."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from typing import Any

from avatarq.captions import Cue, parse_transcript
from avatarq.jobs import Job
from tasks.context import JobHook, PlayContext, Segment
from tasks.control import JobControl
from tasks.link.types import Captions

log = logging.getLogger("avatarq.captions")

#: How often a wait for a cue looks at the clock again: a stream held back by its lease
#: moves the schedule (Pacer.resync), so a cue's time may move while it waits.
RECHECK_S = 0.5
#: How long the end of a play waits for its last cue to be closed.
CLOSE_TIMEOUT_S = 2.0


def attempt_cues(job: Job, duration: float | None, start_at: float) -> list[tuple[int, Cue]]:
    """The cues (numbered from 1 in the transcript) an attempt starting at `start_at` shows:
    those not over there yet (one already running shows at once); none when the job has no
    transcript, or plain text meets audio of unknown length."""
    cues = parse_transcript(job.transcript).cues(duration) if job.transcript else None
    return [(n, c) for n, c in enumerate(cues or (), start=1) if c.end > start_at]


class CaptionCues(JobHook):
    """Publishes the job's cues on the segment's captions, timed to the avatar's playback;
    a stopped stream ends its open cue at once."""

    def __init__(self, job: Job, control: JobControl, limit_s: float) -> None:
        self.job, self.control, self.limit_s = job, control, limit_s
        self._flowing = asyncio.Event()
        self._ended = asyncio.Event()
        self._t0: float | None = None
        self._task: asyncio.Task[None] | None = None

    @classmethod
    def of(cls, run: PlayContext) -> JobHook:
        if run.job.transcript is None:
            return JobHook()
        return cls(run.job, run.control, run.budget.time_limit(None))

    def on_stream_start(self, segment: Segment) -> None:
        if segment.captions is None:
            return
        cues = attempt_cues(self.job, segment.duration, segment.start_at)
        if not cues:
            # All heard before a resume, or plain text over audio of unknown length.
            log.info("job %s: no caption cues to show", self.job.job_id)
            return
        self._task = asyncio.create_task(self._publish(segment, segment.captions, cues))

    def on_chunk_sent(self, segment: Segment, sent: int) -> None:
        if self._t0 is None and segment.pacer.t0 is not None:
            self._t0 = segment.pacer.t0
            self._flowing.set()

    def on_stream_end(self, segment: Segment) -> None:
        self._ended.set()

    async def on_released(self) -> None:
        if self._task is None:
            return
        self._ended.set()
        with contextlib.suppress(TimeoutError, asyncio.CancelledError):
            async with asyncio.timeout(CLOSE_TIMEOUT_S):
                await self._task

    def _plays_at(self, segment: Segment, position: float, out: Captions) -> float:
        """When (time.monotonic()) the avatar plays `position` seconds of the source."""
        t0 = segment.pacer.t0
        assert t0 is not None and self._t0 is not None, "the stream has started"
        started = out.playback_started_at
        # The avatar's own report of its start, moved as the schedule moved since.
        origin = t0 if started is None else max(started, self._t0) + (t0 - self._t0)
        return origin + position - segment.start_at

    async def _until(
        self, position: float, segment: Segment, out: Captions, halt: Sequence[asyncio.Future[Any]]
    ) -> bool:
        """Wait until the avatar plays `position`; False when the stream stopped first."""
        while not any(h.done() for h in halt):
            delay = self._plays_at(segment, position, out) - time.monotonic()
            if delay <= 0:
                return True
            await asyncio.wait(
                halt, timeout=min(delay, RECHECK_S), return_when=asyncio.FIRST_COMPLETED
            )
        return False

    async def _publish(self, segment: Segment, out: Captions, cues: list[tuple[int, Cue]]) -> None:
        halt = [
            asyncio.ensure_future(self.control.stop.wait()),
            asyncio.ensure_future(self._ended.wait()),
        ]
        flowing = asyncio.ensure_future(self._flowing.wait())
        shown: str | None = None
        try:
            async with asyncio.timeout(self.limit_s):
                await asyncio.wait([*halt, flowing], return_when=asyncio.FIRST_COMPLETED)
                if not flowing.done():
                    return
                for number, cue in cues:
                    if not await self._until(cue.start, segment, out, halt):
                        return
                    shown = f"{self.job.job_id}-{number}"
                    await out.show(shown, cue.text)
                    await self._until(cue.end, segment, out, halt)
                    cue_id, shown = shown, None
                    await out.end(cue_id)
        except Exception as e:  # captions never fail a job: the room may be going
            log.warning("job %s: captions stopped: %s", self.job.job_id, e)
        finally:
            for future in (*halt, flowing):
                future.cancel()
            if shown is not None:
                with contextlib.suppress(Exception):
                    await out.end(shown)
