"""Real-time pacing against an absolute clock.

Chunk n is due at `t0 + (audio time before chunk n) - lead`: deadlines come from the byte
count, never from summed sleeps, so scheduling error does not accumulate over an hour.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field


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

    def due(self, sent_bytes: int) -> float:
        if self.t0 is None:
            raise RuntimeError("Pacer.start() was not called")
        return self.t0 + sent_bytes / self.bytes_per_second - self.lead

    async def wait(self, sent_bytes: int) -> None:
        """Sleep until the chunk that starts at byte `sent_bytes` is due."""
        due = self.due(sent_bytes)
        delay = due - self.clock()
        if delay > 0:
            await self.sleep(delay)
        # Chunks the lead lets go at once (due by the start) have no schedule to keep. A
        # chunk already late when asked is recorded too: it is the error that matters most.
        if self.record_errors and self.t0 is not None and due > self.t0:
            self.errors.append(self.clock() - due)
