"""RunAhead: the decoder runs ahead of playback; a long stall ends the segment, a short one is
not seen. Segment.played_position: what the avatar has provably played of the source."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from avatarq.errors import Reason, SourceStalled, TransientJobError
from avatarq.jobs import Job
from tasks.context import Segment
from tasks.link.pacing import Pacer
from tasks.runahead import RunAhead

pytestmark = pytest.mark.timeout(30)


async def source(gaps: dict[int, float], count: int = 10) -> AsyncIterator[bytes]:
    """`count` chunks, pausing `gaps[i]` seconds before chunk i (a stalling origin)."""
    for i in range(count):
        await asyncio.sleep(gaps.get(i, 0.0))
        yield bytes([i]) * 4


async def consume(ahead: RunAhead, pace: float) -> list[bytes]:
    out = []
    async for chunk in ahead:
        out.append(chunk)
        await asyncio.sleep(pace)
    return out


def test_a_stall_shorter_than_the_buffer_is_not_seen() -> None:
    async def run() -> tuple[list[bytes], float]:
        # The consumer takes a chunk every 0.1 s; the source sends all but chunk 8 at once,
        # which comes 0.4 s late: the buffer covers it.
        async with RunAhead(source({8: 0.4}), max_chunks=10, stall_s=0.3) as ahead:
            await asyncio.sleep(0.05)
            t0 = time.monotonic()
            got = await consume(ahead, 0.1)
            return got, time.monotonic() - t0

    got, took = asyncio.run(run())
    assert got == [bytes([i]) * 4 for i in range(10)]
    assert took < 1.3  # ten paced takes, no wait for the late chunk


def test_a_long_stall_ends_with_source_stalled_after_stall_s() -> None:
    async def run() -> tuple[list[bytes], float]:
        got: list[bytes] = []
        async with RunAhead(source({3: 5.0}), max_chunks=10, stall_s=0.3) as ahead:
            t0 = time.monotonic()
            with pytest.raises(SourceStalled) as info:
                async for chunk in ahead:
                    got.append(chunk)
            assert isinstance(info.value, TransientJobError)
            assert info.value.reason == Reason.SOURCE_STALLED
            return got, time.monotonic() - t0

    got, took = asyncio.run(run())
    assert got == [bytes([i]) * 4 for i in range(3)]
    assert 0.25 < took < 1.0


def test_the_buffer_is_bounded() -> None:
    async def run() -> int:
        async with RunAhead(source({}, count=100), max_chunks=5) as ahead:
            await asyncio.sleep(0.1)
            return ahead.buffered

    assert asyncio.run(run()) == 5


def test_errors_arrive_after_the_chunks_before_them() -> None:
    async def failing() -> AsyncIterator[bytes]:
        yield b"ab"
        raise ValueError("decoder failed")

    async def run() -> list[bytes]:
        got: list[bytes] = []
        async with RunAhead(failing(), max_chunks=4) as ahead:
            with pytest.raises(ValueError, match="decoder failed"):
                async for chunk in ahead:
                    got.append(chunk)
        return got

    assert asyncio.run(run()) == [b"ab"]


def test_played_position_is_sent_less_the_lead_from_start_at() -> None:
    job = Job.model_validate({"source": "/a.wav", "room": "r", "avatar_id": "a"})
    segment = Segment(job, 32000, 20.0, Pacer(bytes_per_second=32000, lead=0.5), start_at=7.0)
    assert segment.played_position(0) == 7.0  # nothing provably played yet
    assert segment.played_position(16000) == 7.0  # 0.5 s sent: all of it still in the lead
    assert segment.played_position(32000 * 3) == pytest.approx(9.5)


@pytest.mark.parametrize("turns", range(4))
def test_a_cancel_that_lands_as_a_chunk_arrives_stops_the_consumer(turns: int) -> None:
    """A job's cancel (user cancel, hand-back, deadline) that lands just as the next chunk is
    ready: Python 3.11's `wait_for` returned the chunk and dropped the cancel, and the job
    would have played on."""

    async def run() -> bool:
        release = asyncio.Event()

        async def one_chunk() -> AsyncIterator[bytes]:
            await release.wait()
            yield b"\x00" * 4

        async with RunAhead(one_chunk(), max_chunks=2, stall_s=10) as ahead:

            async def play() -> None:
                async for _chunk in ahead:
                    await asyncio.Event().wait()  # playing it, until stopped

            player = asyncio.create_task(play())
            await asyncio.sleep(0.05)  # the player waits for a chunk
            release.set()
            for _ in range(turns):
                await asyncio.sleep(0)
            player.cancel()
            await asyncio.wait({player}, timeout=2)
            return player.cancelled()

    assert asyncio.run(run())
