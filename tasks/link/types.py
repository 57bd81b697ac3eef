"""The link's words: what the rest of the worker says to and hears from tasks/link/.

Standard library, the shared core and the worker's pure ground (control, pacing) only, so the
job's state machine and its fakes use them without loading LiveKit.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

from avatarq.budget import Budget
from avatarq.events import EventPayload
from avatarq.jobs import Job
from avatarq.results import Timestamps
from avatarq.settings import AvatarServer
from tasks.control import JobControl
from tasks.link.pacing import Pacer


class LinkKey(NamedTuple):
    """What a next job must match to use a warm link."""

    room: str
    avatar_identity: str
    server: str
    sample_rate: int

    @classmethod
    def of(cls, job: Job, server: AvatarServer) -> LinkKey:
        return cls(job.room, job.avatar_identity, server.name, server.sample_rate)


#: Records the avatar session a job started or took over (`Ledger.note_avatar_session`), so a
#: dead worker's session is stopped by recovery: (job id, server name, session id).
SessionNote = Callable[[str, str, str | None], Awaitable[None]]


@dataclass(frozen=True)
class LinkRequest:
    """What getting a link for one play needs: the job, its server and limits, the seconds
    it has left to play, where to note its milestones, session and waits."""

    job: Job
    server: AvatarServer
    budget: Budget
    duration: float | None
    timestamps: Timestamps
    note_session: SessionNote
    emit: Callable[[EventPayload], Awaitable[None]]
    #: Set when the job must stop (cancel, hand-back, take-over): it stops waiting for a slot.
    stop: asyncio.Event

    @property
    def key(self) -> LinkKey:
        return LinkKey.of(self.job, self.server)


@dataclass(frozen=True)
class AvatarSession:
    #: The server's id for the session; None when its answer did not say (or was lost).
    session_id: str | None
    participant_identity: str
    #: False when the POST went out but no answer came: it may or may not be starting.
    acknowledged: bool = True


class AvatarClient(Protocol):
    async def start(
        self, *, livekit_url: str, livekit_token: str, avatar_id: str, avatar_identity: str
    ) -> AvatarSession: ...

    async def stop(self, session: AvatarSession) -> bool:
        """True once the server confirmed the session is stopped."""
        ...

    async def aclose(self) -> None: ...


@dataclass(frozen=True)
class PlaybackFinished:
    playback_position: float
    interrupted: bool


ProgressCallback = Callable[[int], Awaitable[None]]
#: Waits until the segment may send up to the given byte count.
Admit = Callable[[int], Awaitable[None]]


@dataclass(frozen=True)
class Waiting:
    """No slot yet: the job is `place` (0-based) in its server's line."""

    place: int
    sessions: int
    quota: int


class NoAvatarSlot(Exception):  # noqa: N818 - "come back later", not an error
    """Every slot of the job's avatar server is taken: requeue it, without counting an attempt."""

    def __init__(self, server: str, waiting: Waiting) -> None:
        super().__init__(
            f"avatar server {server!r}: {waiting.sessions} of {waiting.quota} sessions in use, "
            f"place {waiting.place + 1} in line"
        )
        self.server = server
        self.waiting = waiting


class Captions(Protocol):
    """Caption cues shown to the room (`lk.transcription`), each from `show` to `end`; the
    caller times them. `playback_started_at` (time.monotonic()) is set when the avatar
    reports it started playing the current segment (`lk.playback_started`), else None."""

    @property
    def playback_started_at(self) -> float | None: ...

    async def show(self, cue_id: str, text: str) -> None: ...

    async def end(self, cue_id: str) -> None: ...


class Sender(Protocol):
    bytes_per_second: int

    @property
    def captions(self) -> Captions | None:
        """Where the segment's captions go; None where there is no room to show them in."""
        ...

    async def send_segment(
        self,
        chunks: AsyncIterator[bytes],
        pacer: Pacer,
        *,
        on_progress: ProgressCallback | None = None,
        stop: Any = None,
        admit: Admit | None = None,
        name: str = ...,
    ) -> int: ...

    async def wait_playback_finished(self, timeout: float) -> PlaybackFinished | None: ...


class Link(Protocol):
    @property
    def sender(self) -> Sender: ...

    @property
    def session_id(self) -> str | None: ...

    def attach(self, control: JobControl) -> None: ...


class LinkSource(Protocol):
    def joining(self, request: LinkRequest) -> AbstractAsyncContextManager[None]:
        """Around opening the job's source: a job that will start cold joins its room
        meanwhile (left again when the job takes no cold start after all)."""
        ...

    async def take_warm(self, request: LinkRequest) -> Link | None: ...

    async def start_cold(self, request: LinkRequest) -> Link: ...

    async def give_back(self, link: Link, *, keep: bool) -> None: ...
