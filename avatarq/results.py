"""A job's result, typed: what workers record as its terminal state and producers read back.

    JobResult (a union discriminated by `status`)
     ├── Played     status "completed" (the avatar confirmed it) or "unconfirmed"
     ├── Failed     status "failed", with a `Reason` code and a sentence
     └── Cancelled  status "cancelled", while queued or while playing

Results travel as JSON: `as_record()` (empty optional fields left out), `parse_result()`."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from avatarq.errors import Reason


class Recording(BaseModel):
    """A recorded job's MP4 (docs/recordings.md): where it is, how long and big it is, and
    whether it stops short of the job's end (cancelled, failed or cut off)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: `s3://bucket/key` or `file:///path`; None when the recording could not be made.
    url: str | None
    duration: float
    size: int
    partial: bool
    backend: str
    #: Why there is no file, or why it is shorter than what played.
    error: str | None = None
    #: The WebVTT of the job's captions beside the MP4 (same name, `.vtt`), when it has any.
    captions_url: str | None = None


class _Result(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    job_id: str
    attempt: int
    room: str | None = None
    avatar_id: str | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
    #: The attempt's recording, when the job asked for one (`record`).
    recording: Recording | None = None

    #: Left out of the record when None.
    _OPTIONAL: ClassVar[frozenset[str]] = frozenset(
        {
            "room",
            "avatar_id",
            "reason",
            "pacing_errors_ms",
            "stopped_at",
            "started_at",
            "ended_at",
            "recording",
            "captions",
        }
    )

    def as_record(self) -> dict[str, Any]:
        """The JSON-safe dict that is stored and announced."""
        record = self.model_dump(mode="json")
        return {k: v for k, v in record.items() if not (v is None and k in self._OPTIONAL)}


class Timestamps(BaseModel):
    """Wall-clock (epoch seconds) milestones of a played job."""

    picked: float
    room_joined: float | None = None
    #: A cold start's ask for its avatar (the room joined and its session slot held): the
    #: avatar's own start is avatar_ready minus this.
    avatar_requested: float | None = None
    avatar_ready: float | None = None
    first_byte: float | None = None
    last_byte: float | None = None
    playback_finished: float | None = None


class AttemptSpan(BaseModel):
    """The part of the source one attempt played (seconds)."""

    model_config = ConfigDict(frozen=True)

    attempt: int
    started_at: float
    ended_at: float


class Played(_Result):
    """Streamed to the avatar: `completed` once it reported playing it, else `unconfirmed`
    (reason `playback_unconfirmed`), which is terminal too and never replayed."""

    status: Literal["completed", "unconfirmed"]
    reason: Reason | None = None
    audio_duration: float
    seconds_streamed: float
    playback_position: float | None
    interrupted: bool | None
    playback_confirmed: bool
    avatar_server: str
    avatar_session_id: str | None
    warm: bool
    lead: float
    sample_rate: int
    timestamps: Timestamps
    #: This attempt's segment in the source (seconds): where it started (a resumed job's
    #: checkpoint, else 0) and where it ended (the avatar's report, else what was sent).
    started_at: float = 0.0
    ended_at: float | None = None
    #: Every attempt's span, the earlier ones from the ledger's checkpoints, and the seconds
    #: of the source that more than one of them played (at most: an attempt's span ends at
    #: what it sent).
    attempts: list[AttemptSpan] = Field(default_factory=list)
    seconds_heard_twice: float = 0.0
    #: The conversational agent (its process id, avatarq_agents) whose avatar session played
    #: it; None when a worker started or kept the avatar.
    agent: str | None = None
    #: Benchmarks only (AVATARQ_PACING_TRACE): the schedule error of every chunk.
    pacing_errors_ms: list[float] | None = None
    #: Caption cues of the job's transcript in this attempt's part of the source, all shown
    #: as the avatar played them (None: the job has no transcript).
    captions: int | None = None


class Failed(_Result):
    status: Literal["failed"] = "failed"
    reason: str
    error: str
    #: The failed attempt's segment in the source (seconds), when it had started playing.
    started_at: float | None = None
    ended_at: float | None = None


class Cancelled(_Result):
    status: Literal["cancelled"] = "cancelled"
    reason: Literal[Reason.CANCELLED] = Reason.CANCELLED
    cancelled_while: Literal["queued", "playing"]
    seconds_streamed: float
    playback_position: float | None
    #: When a playing job stopped (epoch seconds).
    stopped_at: float | None = None
    #: The cancelled attempt's segment in the source (seconds), when it was playing.
    started_at: float | None = None
    ended_at: float | None = None


JobResult = Annotated[Played | Failed | Cancelled, Field(discriminator="status")]
_ADAPTER: TypeAdapter[Played | Failed | Cancelled] = TypeAdapter(JobResult)


def parse_result(record: dict[str, Any]) -> Played | Failed | Cancelled:
    """A stored result read back as its type; raises pydantic's ValidationError when a record
    is not a result."""
    return _ADAPTER.validate_python(record)
