"""Fakes at the seams of a job's run (tasks/seams.py), like dramatiq's StubBroker: an in-memory
ledger, a recording reporter, audio that needs no ffmpeg, and links whose sender "plays" at
once. With them every branch of `JobRun` and `Playback` runs in milliseconds, no namespace.
The real parts are tested on the real stack (tests/test_pipeline_e2e.py and the fault suite).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from redis.exceptions import RedisError

from avatarq.events import Event, EventPayload
from avatarq.jobs import Job
from avatarq.ledger.types import Checkpoint, Claim, Finish, Handoff, Progress
from avatarq.results import JobResult
from avatarq.settings import Settings
from tasks.backoff import RedisPatience
from tasks.control import JobControl, StopReason
from tasks.hooks import HookFactory, LeaseWatch
from tasks.jobrun import JobParts, JobRun, Outcome, Timing
from tasks.link.pacing import Pacer
from tasks.link.types import (
    Admit,
    Captions,
    Link,
    LinkRequest,
    PlaybackFinished,
    ProgressCallback,
)
from tasks.playback import Playback
from tasks.seams import Audio, AudioSpec

RATE = 16000
BPS = RATE * 2
#: Fast waits: what the defaults make seconds, the fakes make milliseconds.
FAST = Timing(room_wait_s=0.05, room_poll_s=0.01, redis=RedisPatience(base_s=0.001))
WATCH_S = 0.005


class FakeLedger:
    """The ledger's decisions, scripted: `claims` are answered in turn (the last one repeats),
    `cancel`/`ours` are what every watch tick sees."""

    def __init__(self, claims: Sequence[tuple[Claim, int]] = ((Claim.OK, 1),)) -> None:
        self.claims = list(claims)
        self.claim_calls = 0
        self.cancel = False
        self.ours = True
        #: What watch ticks see of `ours`, when they cannot tell (None: the same).
        self.watch_ours: bool | None = None
        self.watch_calls = 0
        #: The progress each watch tick recorded.
        self.progress: list[Progress] = []
        #: What earlier attempts of a job left (Ledger.checkpoint).
        self.checkpoints: dict[str, Checkpoint] = {}
        self.releases: list[bool] = []  # uncount flag of each release
        self.records: dict[str, dict[str, Any]] = {}
        self.dead_letters: list[tuple[dict[str, Any], dict[str, Any]]] = []
        self.sessions: list[tuple[str, str, str | None]] = []
        self.owners: dict[str, Any] = {}
        #: The payload parked next in the job's room (`next_in_room`).
        self.next_payload: Any | None = None
        #: `finish` raises RedisError this many times first.
        self.finish_outages = 0
        #: The watch ticks (by number, from 1) that find Redis out of reach.
        self.watch_outage: range = range(0)
        #: What a recorded `finish` hands on (the room's next parked job).
        self.next_in_lane: Handoff | None = None

    async def claim(
        self, job_id: str, room: str, token: str, *, park: Handoff | None = None
    ) -> tuple[Claim, int]:
        self.claim_calls += 1
        return self.claims.pop(0) if len(self.claims) > 1 else self.claims[0]

    async def watch(
        self, job_id: str, room: str, token: str, progress: Progress | None = None
    ) -> tuple[bool, bool]:
        self.watch_calls += 1
        if self.watch_calls in self.watch_outage:
            raise RedisError("connection reset")
        if progress is not None:
            self.progress.append(progress)
        return self.cancel, self.ours if self.watch_ours is None else self.watch_ours

    async def release(self, job_id: str, room: str, token: str, *, uncount: bool = False) -> bool:
        self.releases.append(uncount)
        return self.ours

    async def finish(
        self,
        job_id: str,
        room: str | None,
        result: dict[str, Any],
        *,
        token: str,
        hand_on: bool = True,
        webhook: str | None = None,
    ) -> Finish:
        if self.finish_outages > 0:
            self.finish_outages -= 1
            raise RedisError("connection refused")
        if not self.ours:
            return Finish(recorded=False, ours=False)
        if job_id in self.records:
            return Finish(recorded=False)
        self.records[job_id] = result
        return Finish(recorded=True, next=self.next_in_lane if hand_on else None)

    async def record(self, job_id: str) -> dict[str, Any] | None:
        return self.records.get(job_id)

    async def checkpoint(self, job_id: str) -> Checkpoint:
        return self.checkpoints.get(job_id, Checkpoint())

    async def dead_letter(self, job_payload: Mapping[str, Any], result: Mapping[str, Any]) -> None:
        self.dead_letters.append((dict(job_payload), dict(result)))

    async def owned_by_another(self, job_id: str, payload: Any) -> bool:
        return job_id in self.owners and self.owners[job_id] != payload

    async def note_avatar_session(self, job_id: str, server: str, session_id: str | None) -> None:
        self.sessions.append((job_id, server, session_id))

    async def next_in_room(self, room: str) -> Any | None:
        return self.next_payload


class FakeReporter:
    def __init__(self) -> None:
        self.events: list[tuple[Event, dict[str, Any]]] = []
        self.announced: list[dict[str, Any]] = []
        self.progress_calls: list[float] = []

    async def emit(self, payload: EventPayload) -> None:
        self.events.append((payload.event, payload.data()))

    async def progress(
        self, streamed_s: float, total_s: float | None, *, force: bool = False
    ) -> None:
        self.progress_calls.append(streamed_s)

    def progress_nowait(self, streamed_s: float, total_s: float | None) -> None:
        self.progress_calls.append(streamed_s)

    async def settle_progress(self) -> None:
        return None

    async def announce(self, result: JobResult, webhook_url: str | None) -> None:
        self.announced.append(result.as_record())

    def names(self) -> list[str]:
        return [event.value for event, _ in self.events]


@dataclass
class FakeAudio:
    """`seconds` of silence in chunks of `chunk_s`; `error` is raised on open instead."""

    seconds: float = 2.0
    declared: float | None = 2.0
    error: Exception | None = None
    opened: int = 0
    #: The jobs made ready ahead of their turn (`prepare`).
    prepared: list[str] = field(default_factory=list)

    def prepare(self, job: Job, spec: AudioSpec) -> None:
        self.prepared.append(job.job_id)

    @contextlib.asynccontextmanager
    async def open(self, job: Job, spec: AudioSpec) -> AsyncIterator[Audio]:
        sample_rate, chunk_bytes = spec.sample_rate, spec.chunk_bytes
        self.opened += 1
        self.start_at = spec.start_at
        if self.error is not None:
            raise self.error
        total = int(self.seconds * sample_rate) * 2
        sizes = [min(chunk_bytes, total - at) for at in range(0, total, chunk_bytes)]
        decoded = [0]

        async def rest() -> AsyncIterator[bytes]:
            for size in sizes[1:]:
                decoded[0] += size
                yield bytes(size)

        decoded[0] = sizes[0]
        yield Audio(self.declared, bytes(sizes[0]), rest(), lambda: decoded[0] / (2 * sample_rate))


@dataclass
class FakeSender:
    """Takes the chunks as fast as they come (no pacing: the pacer is the real stack's
    business), yielding to the loop between them so hooks and watches run. `on_chunk(n)` is
    called after chunk n, to act mid-stream; `report` answers lk.playback_finished (a
    callable of the seconds sent, or None for an avatar that never reports)."""

    bytes_per_second: int = BPS
    on_chunk: Callable[[int], None] | None = None
    fail_after: int | None = None
    report: Callable[[float], PlaybackFinished | None] | None = lambda s: PlaybackFinished(s, False)
    segments: int = 0
    sent_total: int = 0
    captions: Captions | None = None
    _last: float = 0.0

    async def send_segment(
        self,
        chunks: AsyncIterator[bytes],
        pacer: Pacer,
        *,
        on_progress: ProgressCallback | None = None,
        stop: Any = None,
        admit: Admit | None = None,
        name: str = "avatarq",
    ) -> int:
        self.segments += 1
        sent = 0
        n = 0
        async for chunk in chunks:
            if admit is not None:
                await admit(sent + len(chunk))
            if stop is not None and stop.is_set():
                break
            if self.fail_after is not None and n >= self.fail_after:
                raise RuntimeError("engine is closed")
            sent += len(chunk)
            n += 1
            if on_progress is not None:
                await on_progress(sent)
            if self.on_chunk is not None:
                self.on_chunk(n)
            await asyncio.sleep(0.002)
        self.sent_total += sent
        self._last = sent / self.bytes_per_second
        return sent

    async def wait_playback_finished(self, timeout: float) -> PlaybackFinished | None:
        return self.report(self._last) if self.report is not None else None


@dataclass
class FakeLink:
    sender: FakeSender = field(default_factory=FakeSender)
    session_id: str | None = "sess-1"
    control: JobControl | None = None

    def attach(self, control: JobControl) -> None:
        self.control = control

    def lost(self, reason: StopReason) -> None:
        if self.control is not None:
            self.control.request_stop(reason)


class FakeLinks:
    """Cold starts make `FakeLink`s (or raise `start_error`); a link given back with
    keep=True is the next job's warm link, as in the real pool."""

    def __init__(self, sender: FakeSender | None = None) -> None:
        self.sender = sender or FakeSender()
        self.start_error: BaseException | None = None
        self.cold_starts = 0
        self.parked: FakeLink | None = None
        self.given_back: list[bool] = []
        self.current: FakeLink | None = None

    def joining(self, request: LinkRequest) -> contextlib.nullcontext[None]:
        return contextlib.nullcontext()  # a cold start here has no room to join

    async def take_warm(self, request: LinkRequest) -> Link | None:
        link, self.parked = self.parked, None
        if link is not None:
            self.current = link
        return link

    async def start_cold(self, request: LinkRequest) -> Link:
        self.cold_starts += 1
        if self.start_error is not None:
            raise self.start_error
        link = self.current = FakeLink(self.sender)
        await request.note_session(request.job.job_id, request.server.name, link.session_id)
        return link

    async def give_back(self, link: Link, *, keep: bool) -> None:
        self.given_back.append(keep)
        if keep:
            assert isinstance(link, FakeLink)
            self.parked = link


@dataclass
class Stand:
    """Everything one fast test needs around a run."""

    settings: Settings
    ledger: FakeLedger = field(default_factory=FakeLedger)
    reporter: FakeReporter = field(default_factory=FakeReporter)
    audio: FakeAudio = field(default_factory=FakeAudio)
    links: FakeLinks = field(default_factory=FakeLinks)
    leaving: bool = False
    hooks: list[HookFactory] = field(default_factory=list)
    #: The jobs handed to this "worker" to hold (JobParts.hold).
    held: list[Handoff] = field(default_factory=list)

    def parts(self) -> JobParts:
        playback = Playback(self.settings, audio=self.audio, links=self.links)
        return JobParts(
            settings=self.settings,
            ledger=self.ledger,
            reporter=lambda _job_id: self.reporter,
            player=playback,
            shutting_down=lambda: self.leaving,
            hooks=[LeaseWatch.factory(lambda: self.leaving, WATCH_S), *self.hooks],
            timing=FAST,
            hold=self.held.append,
        )

    async def run(self, payload: Any, task_id: str = "task-1") -> Outcome:
        return await JobRun(self.parts(), payload, task_id, "worker/token").run()
