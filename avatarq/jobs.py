"""The job schema: what a producer sends and what a worker plays.

Validated at enqueue and again in the worker (a payload may come from any producer, in any
language). Unknown fields are an error, so a typo never silently drops an option.
"""

from __future__ import annotations

import json
import re
import uuid
from pathlib import PurePath
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    HttpUrl,
    Tag,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from yarl import URL

from avatarq.captions import CaptionError, parse_transcript
from avatarq.errors import InvalidJob, Reason
from avatarq.settings import NAME_PATTERN, AvatarServer, Settings, get_settings

#: Source URL schemes the worker can open.
SOURCE_SCHEMES = ("file", "http", "https", "s3")
JOB_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$"
MAX_METADATA_BYTES = 16 * 1024
#: TTS engines a `tts` source may name (implemented in producers/tts/).
TtsEngineName = Literal["espeak", "openai", "elevenlabs"]


def new_job_id() -> str:
    return uuid.uuid4().hex


class TtsSource(BaseModel):
    """Speech to render before the job is enqueued: workers only ever play audio files."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["tts"]
    text: str = Field(min_length=1)
    """What to say; SSML markup when `ssml` is true. At most `AVATARQ_TTS_MAX_CHARS`."""
    engine: TtsEngineName = "espeak"
    voice: str | None = Field(None, min_length=1, max_length=256)
    """Engine-specific voice (espeak `en-us`, OpenAI `alloy`, an ElevenLabs voice id)."""
    language: str | None = Field(None, min_length=2, max_length=35)
    """BCP 47 language; espeak picks its voice from it when `voice` is not given."""
    ssml: bool = False

    @field_validator("text")
    @classmethod
    def _within_limit(cls, v: str, info: ValidationInfo) -> str:
        limit = _settings(info).tts_max_chars
        if len(v) > limit:
            raise ValueError(
                f"text is {len(v)} characters, over the AVATARQ_TTS_MAX_CHARS limit of {limit}"
            )
        return v


def _settings(info: ValidationInfo) -> Settings:
    """The settings a job's limits come from: those of the process validating it, passed by
    `parse_job(…, settings=…)`; the process-wide ones where a framework validates the model
    itself (FastAPI's request body), and the API parses the job again with its own."""
    given = (info.context or {}).get("settings")
    return given if isinstance(given, Settings) else get_settings()


def _source_kind(v: Any) -> str:
    return "tts" if isinstance(v, (dict, TtsSource)) else "audio"


#: A source is either audio (path or URL) or speech to render; tagged so errors name the kind.
Source = Annotated[
    Annotated[str, Field(min_length=1, max_length=4096), Tag("audio")]
    | Annotated[TtsSource, Tag("tts")],
    Discriminator(_source_kind),
]


def _readable_http_url(url: str) -> None:
    """An http(s) source as the worker's HTTP client (yarl, under aiohttp) reads it: a port
    out of range, a backslash or an invisible character in the host fail the job here, not
    its fetch later (which would be retried as a network fault)."""
    try:
        host = URL(url).host
    except ValueError as e:
        raise ValueError(f"source URL cannot be read: {e}") from None
    if not host:
        raise ValueError("source URL names no host")


class Job(BaseModel):
    """One render job: play `source` through avatar `avatar_id` in LiveKit room `room`."""

    # NaN and infinities are no lengths (and not JSON): refused in every float field.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    job_id: str = Field(default_factory=new_job_id, pattern=JOB_ID_PATTERN)
    """Idempotency key: a job id that completed is never played again."""
    room: str = Field(pattern=NAME_PATTERN)
    avatar_id: str = Field(pattern=NAME_PATTERN)
    avatar_server: str | None = Field(None, pattern=NAME_PATTERN)
    """Name of an avatar server configured in the worker's settings (`AVATARQ_AVATAR_SERVERS`);
    omitted: the `AVALUMA_API_URL` one. Never a URL: the license key goes there."""
    sample_rate: None = Field(None, exclude=True)
    """Refused with a clear message: the avatar server's settings fix the rate."""
    source: Source
    """Audio to play: a local path, `file://`, `http(s)://` or `s3://bucket/key`; or a `tts`
    object, which `producers.enqueue` renders to stored audio before sending."""
    lead: float | None = Field(None, ge=0.0, le=30.0)
    """Seconds the sender may run ahead of real time; defaults to the `AVATARQ_DEFAULT_LEAD`."""
    max_duration: float | None = Field(None, gt=0.0)
    """Refuse audio longer than this many seconds (and bound the job's time limit); at most
    `AVATARQ_MAX_JOB_DURATION`."""
    metadata: dict[str, Any] = Field(default_factory=dict)
    """Free data echoed in the result and events."""
    webhook_url: HttpUrl | None = None
    record: bool | str = False
    """Record the avatar's video and audio of this job to an MP4 (docs/recordings.md): `true`
    stores it where the worker's `AVATARQ_RECORDINGS` says, `s3://bucket/prefix/` there."""
    resume: Literal["checkpoint", "start"] = "checkpoint"
    """After a fault, play on from where the listener stopped hearing (less
    `AVATARQ_RESUME_OVERLAP`), or `start` again from the beginning."""
    transcript: str | None = Field(None, min_length=1)
    """What the audio says, for captions in the room and a WebVTT file: plain text (timed by
    its share of the audio), SRT or WebVTT. A `tts` source's text is its transcript."""
    interrupt: bool = False
    """In a room whose avatar a conversational agent holds (avatarq_agents): cut its current
    speech short instead of waiting for it to end. Elsewhere it changes nothing."""

    @field_validator("avatar_server", mode="before")
    @classmethod
    def _a_name_not_a_url(cls, v: Any) -> Any:
        if isinstance(v, str) and "/" in v:
            raise ValueError(
                "avatar_server names a server configured in the worker's "
                "AVATARQ_AVATAR_SERVERS setting, never a URL (the license key goes there)"
            )
        return v

    @field_validator("sample_rate", mode="before")
    @classmethod
    def _not_a_job_option(cls, v: Any) -> Any:
        if v is not None:
            raise ValueError(
                "sample_rate is not a job option: the worker sends the rate the avatar server "
                "expects (its sample_rate in AVATARQ_AVATAR_SERVERS, 16000 for Avaluma)"
            )
        return v

    @field_validator("source")
    @classmethod
    def _known_scheme(cls, v: str | TtsSource) -> str | TtsSource:
        if isinstance(v, TtsSource):
            return v
        scheme = urlsplit(v).scheme.lower()
        # A bare path (or a Windows drive letter) is a local file.
        if scheme and len(scheme) > 1 and scheme not in SOURCE_SCHEMES:
            raise ValueError(
                f"source scheme {scheme!r} is not supported (use a path or one of "
                f"{', '.join(s + '://' for s in SOURCE_SCHEMES)})"
            )
        if scheme == "s3" and not re.match(r"^s3://[^/]+/.+", v):
            raise ValueError("s3 source must look like s3://bucket/key")
        if scheme in ("http", "https"):
            _readable_http_url(v)
        if not scheme and not PurePath(v).name:
            raise ValueError("source path names no file")
        return v

    @field_validator("record")
    @classmethod
    def _record_destination(cls, v: bool | str) -> bool | str:
        # A job may name a bucket, never a path on the worker's disk: the worker writes there.
        if isinstance(v, str) and not re.match(r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/.*)?$", v):
            raise ValueError(
                f"record must be true, false or an s3://bucket/prefix/ destination, not {v!r}"
            )
        return v

    @field_validator("max_duration")
    @classmethod
    def _within_cap(cls, v: float | None, info: ValidationInfo) -> float | None:
        cap = _settings(info).max_job_duration_s
        if v is not None and v > cap:
            raise ValueError(
                f"max_duration {v:g}s is over the AVATARQ_MAX_JOB_DURATION limit of {cap:g}s"
            )
        return v

    @field_validator("transcript")
    @classmethod
    def _captionable(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is not None:
            limit = info.data.get("max_duration") or _settings(info).max_job_duration_s
            try:
                parse_transcript(v, limit)
            except CaptionError as e:
                raise ValueError(str(e)) from None
        return v

    @field_validator("metadata")
    @classmethod
    def _small_json(cls, v: dict[str, Any]) -> dict[str, Any]:
        try:
            size = len(json.dumps(v, allow_nan=False))
        except (TypeError, ValueError) as e:
            # allow_nan=False: NaN and Infinity are not JSON; other languages cannot read them.
            raise ValueError(f"metadata must be JSON-serializable: {e}") from None
        if size > MAX_METADATA_BYTES:
            raise ValueError(f"metadata is {size} bytes, over the {MAX_METADATA_BYTES} limit")
        return v

    @property
    def avatar_identity(self) -> str:
        """The avatar's participant identity, fixed by the avatar server's convention."""
        return f"avatar-{self.avatar_id}"

    @property
    def worker_identity(self) -> str:
        return f"avatarq-{self.job_id}"

    @property
    def remote_source(self) -> bool:
        """Opening the source waits on the network: an http(s) URL or an S3 object."""
        if not isinstance(self.source, str):
            return False
        return urlsplit(self.source.strip()).scheme.lower() in ("http", "https", "s3")

    def payload(self) -> dict[str, Any]:
        """The JSON-safe dict that travels through the broker."""
        return self.model_dump(mode="json", exclude_none=True)


def field_errors(err: ValidationError) -> list[tuple[str, str]]:
    """Each problem as (field, message), e.g. `("sample_rate", "sample_rate 7 is not one of…")`."""
    return [
        (".".join(str(p) for p in e["loc"]) or "job", e["msg"].removeprefix("Value error, "))
        for e in err.errors()
    ]


def describe_validation_error(err: ValidationError) -> str:
    """One line per problem, naming the field: `room: field required; sample_rate: …`."""
    return "; ".join(f"{where}: {msg}" for where, msg in field_errors(err))


def job_errors(payload: dict[str, Any], settings: Settings | None = None) -> list[tuple[str, str]]:
    """Every problem with a job payload as (field, message); empty when it is a valid job.

    For producers that report each bad field with its own position (manifest lines, schedule
    file lines) rather than parse_job's one-sentence error.
    """
    try:
        Job.model_validate(payload, context={"settings": settings})
    except ValidationError as e:
        return field_errors(e)
    return []


def parse_job(payload: Any, settings: Settings | None = None) -> Job:
    """Validate a job payload from any producer against `settings`' limits; raises InvalidJob
    naming each bad field."""
    if isinstance(payload, Job):
        return payload
    if not isinstance(payload, dict):
        raise InvalidJob(f"job payload must be a JSON object, not {type(payload).__name__}")
    try:
        return Job.model_validate(payload, context={"settings": settings})
    except ValidationError as e:
        raise InvalidJob(f"invalid job: {describe_validation_error(e)}") from None


def resolve_server(job: Job, settings: Settings) -> AvatarServer:
    """The configured server the job names; a name the settings lack fails the job alone."""
    try:
        return settings.avatar_server(job.avatar_server)
    except KeyError as e:
        raise InvalidJob(str(e.args[0]), reason=Reason.UNKNOWN_AVATAR_SERVER) from None
