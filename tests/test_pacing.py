"""Pacing against an absolute clock: lateness of one sleep never carries into the next."""

from __future__ import annotations

import asyncio

from tasks.link.pacing import Pacer, tail_pieces

RATE = 32000.0  # bytes/s: 16 kHz s16 mono
CHUNK = 3200  # 100 ms


class FakeTime:
    """A clock that moves only when slept on, each sleep overshooting by `overshoot`."""

    def __init__(self, overshoot: float) -> None:
        self.now = 1000.0
        self.overshoot = overshoot

    def clock(self) -> float:
        return self.now

    async def sleep(self, delay: float) -> None:
        self.now += delay + self.overshoot


def run_chunks(pacer: Pacer, fake: FakeTime, n: int) -> list[float]:
    sent_at = []

    async def go() -> None:
        pacer.start()
        for i in range(n):
            await pacer.wait(i * CHUNK)
            sent_at.append(fake.now)

    asyncio.run(go())
    return sent_at


def test_overshoot_does_not_accumulate() -> None:
    fake = FakeTime(overshoot=0.004)
    pacer = Pacer(RATE, lead=0.0, clock=fake.clock, sleep=fake.sleep, record_errors=True)
    sent = run_chunks(pacer, fake, 6000)  # 10 minutes of audio
    # Summed sleeps would be 6000 × 4 ms = 24 s late by the end; absolute deadlines stay 4 ms.
    assert abs(sent[-1] - (1000.0 + 5999 * 0.1)) <= 0.0041
    assert max(pacer.errors) <= 0.0041


def test_lead_sends_ahead_then_real_time() -> None:
    fake = FakeTime(overshoot=0.0)
    pacer = Pacer(RATE, lead=0.5, clock=fake.clock, sleep=fake.sleep)
    sent = run_chunks(pacer, fake, 20)
    # The first 0.5 s of audio (chunks 0..5) leave at once; then one chunk per 100 ms.
    assert sent[:6] == [1000.0] * 6
    assert [round(b - a, 6) for a, b in zip(sent[5:], sent[6:], strict=False)] == [0.1] * 14


def test_real_sleep_tracks_wall_clock() -> None:
    pacer = Pacer(RATE, lead=0.0)

    async def go() -> float:
        loop = asyncio.get_running_loop()
        pacer.start()
        t0 = loop.time()
        for i in range(6):
            await pacer.wait(i * CHUNK)
        return loop.time() - t0

    elapsed = asyncio.run(go())
    assert elapsed >= 0.5 - 0.01  # never early


def test_tail_pieces_cut_the_last_chunk_on_frame_boundaries() -> None:
    chunk = bytes(12800)  # 400 ms
    assert [len(p) for p in tail_pieces(chunk, 32000)] == [3200] * 4
    assert [len(p) for p in tail_pieces(bytes(7000), 32000)] == [3200, 3200, 600]
    # 44.1 kHz stereo: 4-byte frames, so no piece splits a frame.
    assert all(len(p) % 4 == 0 for p in tail_pieces(bytes(40000), 176400, frame_bytes=4))
    assert tail_pieces(b"", 32000) == []


def test_interrupt_ends_a_long_wait_early() -> None:
    pacer = Pacer(RATE, lead=0.0, record_errors=True)

    async def go() -> float:
        loop = asyncio.get_running_loop()
        interrupt: asyncio.Future[None] = loop.create_future()
        pacer.start()
        loop.call_later(0.05, interrupt.set_result, None)
        t0 = loop.time()
        await pacer.wait(int(RATE * 10), interrupt)  # due in 10 s
        return loop.time() - t0

    assert asyncio.run(go()) < 1.0
    assert pacer.errors == []  # a stop is not a schedule error


def test_a_hold_within_the_lead_keeps_the_schedule_a_longer_one_moves_it() -> None:
    fake = FakeTime(overshoot=0.0)
    pacer = Pacer(RATE, lead=0.3, clock=fake.clock, sleep=fake.sleep)
    pacer.start()
    # Chunk 10 (at 1.0 s of audio) is due at 0.7 s; held until 0.9 s, the avatar still had
    # 0.1 s to play: nothing moves.
    fake.now = 1000.9
    pacer.resync(10 * CHUNK)
    assert pacer.due(11 * CHUNK) == 1000.0 + 1.1 - 0.3
    # Held until 1.5 s: the avatar ran dry 0.5 s ago, so what follows comes 0.5 s later
    # (no burst that would leave it more than the lead).
    fake.now = 1001.5
    pacer.resync(10 * CHUNK)
    assert abs(pacer.due(11 * CHUNK) - (1000.0 + 0.5 + 1.1 - 0.3)) < 1e-9
