"""The interfaces a job's run is given, so each part can be replaced: by the real one in a
worker (tasks/render.py wires them), by a fake in the fast tests (tests/fakes.py).
The link's own interfaces (`LinkSource`, `Link`, `Sender`) are in tasks/link/types.py.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, Protocol

from avatarq.events import EventPayload
from avatarq.jobs import Job
from avatarq.ledger.types import Checkpoint, Claim, Finish, Handoff, Progress
from avatarq.results import JobResult


# Who may play a job, its lease, its one terminal record (avatarq/ledger/worker.py).
class JobLedger(Protocol):
    async def claim(
        self, job_id: str, room: str, token: str, *, park: Handoff | None = None
    ) -> tuple[Claim, int]: ...

    async def watch(
        self, job_id: str, room: str, token: str, progress: Progress | None = None
    ) -> tuple[bool, bool]: ...

    async def release(
        self, job_id: str, room: str, token: str, *, uncount: bool = False
    ) -> bool: ...

    async def finish(
        self,
        job_id: str,
        room: str | None,
        result: dict[str, Any],
        *,
        token: str,
        hand_on: bool = True,
        webhook: str | None = None,
    ) -> Finish: ...

    async def record(self, job_id: str) -> dict[str, Any] | None: ...

    async def checkpoint(self, job_id: str) -> Checkpoint: ...

    async def dead_letter(
        self, job_payload: Mapping[str, Any], result: Mapping[str, Any]
    ) -> None: ...

    async def owned_by_another(self, job_id: str, payload: Any) -> bool: ...

    async def note_avatar_session(
        self, job_id: str, server: str, session_id: str | None
    ) -> None: ...

    async def next_in_room(self, room: str) -> Any | None: ...


# Events, progress, the announcement and webhook (tasks/report.py).
class Reporter(Protocol):
    async def emit(self, payload: EventPayload) -> None: ...

    async def progress(
        self, streamed_s: float, total_s: float | None, *, force: bool = False
    ) -> None: ...

    def progress_nowait(self, streamed_s: float, total_s: float | None) -> None: ...

    async def settle_progress(self) -> None: ...

    async def announce(self, result: JobResult, webhook_url: str | None) -> None: ...


@dataclass
class Audio:
    """A source being decoded: its declared length (of the whole source, whatever the
    start), the first chunk (decoded before the avatar is asked for, so a bad file costs no
    session), and the rest."""

    duration: float | None
    first: bytes
    rest: AsyncIterator[bytes]
    #: Seconds decoded so far (all of it once `rest` is exhausted).
    decoded_seconds: Callable[[], float]


# Source → decoded PCM chunks (tasks/playback.py FfmpegAudio).
@dataclass(frozen=True)
class AudioSpec:
    """How a job's source is decoded: its length limit, the avatar's rate, the size of each
    chunk, and where in the source it starts (seconds)."""

    max_seconds: float
    sample_rate: int
    chunk_bytes: int
    start_at: float = 0.0


class AudioOpener(Protocol):
    def open(self, job: Job, spec: AudioSpec) -> AbstractAsyncContextManager[Audio]: ...

    def prepare(self, job: Job, spec: AudioSpec) -> None:
        """Start opening a job's source that is likely next, for its `open` to take over."""
        ...


#: Builds the reporter of one job id.
ReporterFactory = Callable[[str], Reporter]
