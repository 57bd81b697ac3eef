"""Real-time pacing against an absolute clock.

Chunk n is due at `t0 + (audio time before chunk n) - lead`: deadlines come from the byte
count, never from summed sleeps, so scheduling error does not accumulate over an hour.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

#: The last write of a segment is cut into pieces of at most this much audio. A chunk is due
#: when the avatar is down to the lead, so after the last write it holds the lead plus that
#: write: large chunks (fewer writes, each an FFI round trip) would otherwise lengthen the
#: wait for `lk.playback_finished` by their own length.
TAIL_SECONDS = 0.1


def tail_pieces(chunk: bytes, bytes_per_second: int, frame_bytes: int = 2) -> list[bytes]:
    """`chunk` cut into pieces of at most TAIL_SECONDS of audio, on frame boundaries."""
    size = max(frame_bytes, int(bytes_per_second * TAIL_SECONDS) // frame_bytes * frame_bytes)
    return [chunk[i : i + size] for i in range(0, len(chunk), size)]


@dataclass
class Pacer:
    bytes_per_second: float
    lead: float
    clock: Callable[[], float] = time.monotonic
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
    #: Keep each chunk's schedule error (actual minus ideal send time, seconds) for benchmarks.
    record_errors: bool = False
    errors: list[float] = field(default_factory=list)
    t0: float | None = None

    def start(self) -> None:
        self.t0 = self.clock()

    def resync(self, sent_bytes: int) -> None:
        """After the stream held still before the chunk at `sent_bytes`: if the avatar ran
        dry meanwhile (it plays on from its lead first), the rest is due that much later,
        not in a burst that would make it hold more than the lead."""
        if self.t0 is None:
            return
        dry = self.clock() - (self.t0 + sent_bytes / self.bytes_per_second)
        if dry > 0:
            self.t0 += dry

    def due(self, sent_bytes: int) -> float:
        if self.t0 is None:
            raise RuntimeError("Pacer.start() was not called")
        return self.t0 + sent_bytes / self.bytes_per_second - self.lead

    async def wait(self, sent_bytes: int, interrupt: asyncio.Future[Any] | None = None) -> None:
        """Sleep until the chunk that starts at byte `sent_bytes` is due, or until `interrupt`
        is done (a stop must not wait out a long chunk)."""
        due = self.due(sent_bytes)
        delay = due - self.clock()
        if delay > 0:
            if interrupt is None:
                await self.sleep(delay)
            else:
                # shield: the timeout cancels only this wait, not the shared interrupt.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await asyncio.shield(interrupt)
                if interrupt.done():
                    return
        # Chunks the lead lets go at once (due by the start) have no schedule to keep. A
        # chunk already late when asked is recorded too: it is the error that matters most.
        if self.record_errors and self.t0 is not None and due > self.t0:
            self.errors.append(self.clock() - due)
