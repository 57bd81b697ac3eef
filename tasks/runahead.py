"""Decode ahead of real time, so a source that stalls briefly is never heard.

A reader task fills a bounded queue while playback drains it at real-time pace. When it has
been empty for `stall_s`, the consumer gets `SourceStalled`, so the sender can end the segment
cleanly before the avatar's own idle timeout does (docs/resume.md)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from avatarq.errors import SourceStalled

#: Audio decoded ahead of playback at most (memory: 30 s of 16 kHz mono s16le is ~1 MB).
RUN_AHEAD_S = 30.0
#: How long an empty buffer may wait for the source before the segment is ended: with the
#: pacer's lead still buffered at the avatar, its silence stays well below its 10 s timeout.
SOURCE_STALL_S = 5.0

_END = object()


class RunAhead:
    """`async with RunAhead(chunks, max_chunks=n) as ahead: async for c in ahead: ...`

    Errors of the underlying iterator reach the consumer in order, after the chunks before
    them. Leaving the block stops the reader (the decoder behind it is closed by its owner).
    """

    def __init__(
        self, chunks: AsyncIterator[bytes], *, max_chunks: int, stall_s: float = SOURCE_STALL_S
    ) -> None:
        if max_chunks < 1:
            raise ValueError(f"max_chunks must be at least 1, got {max_chunks}")
        self._chunks = chunks
        self._queue: asyncio.Queue[bytes | BaseException | object] = asyncio.Queue(max_chunks)
        self.stall_s = stall_s
        self._reader: asyncio.Task[None] | None = None

    @property
    def buffered(self) -> int:
        """Chunks decoded and not yet taken."""
        return self._queue.qsize()

    async def __aenter__(self) -> RunAhead:
        self._reader = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader

    async def _read(self) -> None:
        try:
            async for chunk in self._chunks:
                await self._queue.put(chunk)
        except Exception as e:  # handed to the consumer, which raises it in its own task
            await self._queue.put(e)
        else:
            await self._queue.put(_END)

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._take()

    async def _take(self) -> AsyncIterator[bytes]:
        while True:
            try:
                async with asyncio.timeout(self.stall_s):
                    item = await self._queue.get()
            except TimeoutError:
                raise SourceStalled(
                    f"the audio source sent nothing for {self.stall_s:g}s with the buffer "
                    "empty: the segment was ended at the last sample sent"
                ) from None
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            assert isinstance(item, bytes)
            yield item
