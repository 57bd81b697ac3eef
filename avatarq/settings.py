"""Settings from the environment and `.env.local`, under the names users already have.

LiveKit's own variables (`LIVEKIT_URL`, `LIVEKIT_API_KEY`, `LIVEKIT_API_SECRET`), the Avaluma
plugin's and examples' names, the standard AWS variables, and `AVATARQ_*` for our own knobs.
Secrets are `SecretStr` so they never print by accident.
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    HttpUrl,
    SecretStr,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from avatarq.ledger.keys import EVENTS_STREAM

#: Room names, avatar ids and avatar server names: what LiveKit accepts in identities and room
#: names, conservatively (jobs are validated against it, avatarq/jobs.py).
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:@=-]{0,127}$"
_SERVER_NAME = re.compile(NAME_PATTERN)
#: The name jobs use (or omit) for the avatar server of `AVALUMA_API_URL`.
DEFAULT_AVATAR_SERVER = "default"
#: Avaluma's plugin and server work at 16 kHz.
AVALUMA_SAMPLE_RATE = 16000
#: Avaluma recommends about 10 concurrent sessions per license key.
AVALUMA_MAX_SESSIONS = 10


def _env(*names: str) -> AliasChoices:
    return AliasChoices(*names)


class AvatarServer(BaseModel):
    """One avatar server a job may name. Only settings define them: the license key and the
    room's LiveKit token go to this URL, so a job can never choose where they are sent."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: HttpUrl
    #: Its own license key; the `AVALUMA_LICENSE_KEY` setting when omitted.
    license_key: SecretStr | None = None
    #: The PCM rate its receiver expects; the worker resamples every source to it.
    sample_rate: int = Field(AVALUMA_SAMPLE_RATE, ge=8000, le=48000)
    #: Concurrent sessions it (or its license) allows across the fleet.
    max_sessions: int = Field(AVALUMA_MAX_SESSIONS, ge=1)
    #: The name jobs use for it: its key in the settings (set by `Settings.avatar_server`).
    name: str = DEFAULT_AVATAR_SERVER

    @property
    def base_url(self) -> str:
        return str(self.url).rstrip("/")


class Settings(BaseSettings):
    # A settings error never echoes what it was given: the input holds the secrets.
    model_config = SettingsConfigDict(
        env_file=".env.local",
        env_file_encoding="utf-8",
        extra="ignore",
        populate_by_name=True,
        hide_input_in_errors=True,
    )

    # --- LiveKit ----------------------------------------------------------------------------
    #: The LiveKit server workers join (Cloud or self-hosted).
    livekit_url: str = Field("ws://localhost:7880", validation_alias=_env("LIVEKIT_URL"))
    #: Where browsers (the console's room view) reach LiveKit, when not at `livekit_url`.
    livekit_public_url: str | None = Field(None, validation_alias=_env("LIVEKIT_PUBLIC_URL"))
    #: Signs every token a job uses; the secret never leaves settings.
    livekit_api_key: str = Field("devkey", validation_alias=_env("LIVEKIT_API_KEY"))
    livekit_api_secret: SecretStr = Field(
        SecretStr("secret"), validation_alias=_env("LIVEKIT_API_SECRET")
    )

    # --- Avatar servers -----------------------------------------------------------------------
    #: Sent as `api-secret` to the configured avatar servers only (see `avatar_servers`).
    avaluma_license_key: SecretStr = Field(
        SecretStr(""), validation_alias=_env("AVALUMA_LICENSE_KEY", "AVALUMA_API_KEY")
    )
    #: The `default` avatar server.
    avaluma_api_url: str = Field(
        "https://api.avaluma.ai", validation_alias=_env("AVALUMA_API_URL", "AVATAR_SERVER_URL")
    )
    #: Concurrent sessions the `default` server (its license) allows across the fleet.
    avaluma_max_sessions: int = Field(
        AVALUMA_MAX_SESSIONS, ge=1, validation_alias=_env("AVATARQ_AVATAR_MAX_SESSIONS")
    )
    #: Further avatar servers jobs may pick by name (`avatar_server`), as JSON:
    #: `{"eu": {"url": "https://eu.example", "sample_rate": 16000, "license_key": "..."}}`.
    #: The `AVALUMA_API_URL` server is always there as `default` unless this redefines it.
    avatar_servers: dict[str, AvatarServer] = Field(
        default_factory=dict, validation_alias=_env("AVATARQ_AVATAR_SERVERS")
    )
    #: Wait for the avatar to join, publish video and listen (s).
    avatar_join_timeout_s: float = Field(30.0, validation_alias=_env("AVATARQ_AVATAR_JOIN_TIMEOUT"))
    #: start-avatar calls per job attempt (5xx, 409, 503, connection errors).
    avatar_start_attempts: int = Field(4, validation_alias=_env("AVATARQ_AVATAR_START_ATTEMPTS"))
    #: Wait for `lk.playback_finished` after the buffered audio (s).
    playback_finished_timeout_s: float = Field(
        10.0, validation_alias=_env("AVATARQ_PLAYBACK_FINISHED_TIMEOUT")
    )
    #: Keep a room and its avatar session this long for the next job of the same room (0: off).
    warm_idle_s: float = Field(10.0, ge=0, validation_alias=_env("AVATARQ_WARM_IDLE"))
    #: A job behind its room's playing job parks in the room's lane and is played next by that
    #: job's worker (off: it waits in its worker slot and goes back through the broker, the
    #: design before lanes, kept as the benchmark's comparison row).
    room_lanes: bool = Field(True, validation_alias=_env("AVATARQ_ROOM_LANES"))
    #: A resumed job starts this long before where the listener stopped hearing it, so the
    #: cut falls inside a few words heard twice rather than a word lost (s, at most 1).
    resume_overlap_s: float = Field(
        0.3, ge=0.0, le=1.0, validation_alias=_env("AVATARQ_RESUME_OVERLAP")
    )

    # --- Recording -----------------------------------------------------------------------------
    #: The LiveKit server whose Egress service records jobs (http(s):// or ws(s)://, signed with
    #: LIVEKIT_API_KEY / LIVEKIT_API_SECRET); unset: no Egress (docs/recordings-egress.md).
    egress_url: str | None = Field(None, validation_alias=_env("AVATARQ_EGRESS_URL"))

    # --- Broker and Redis ----------------------------------------------------------------------
    #: Results, events, the ledger; also the broker unless `CELERY_BROKER_URL` says otherwise.
    redis_url: str = Field("redis://localhost:6379/0", validation_alias=_env("REDIS_URL"))
    celery_broker_url: str | None = Field(None, validation_alias=_env("CELERY_BROKER_URL"))
    celery_result_backend: str | None = Field(None, validation_alias=_env("CELERY_RESULT_BACKEND"))
    #: After this long a Redis broker hands an unacknowledged job to another worker (s);
    #: default the longest job + 600 s (`redelivery_after_s`).
    visibility_timeout_s: float | None = Field(
        None, gt=0, validation_alias=_env("AVATARQ_VISIBILITY_TIMEOUT")
    )
    #: The type of the jobs' queue on a RabbitMQ broker: `quorum` (replicated; countdowns wait
    #: in the broker) or `classic`, for a broker that already has the classic queue
    #: (docs/configuration.md says how to move).
    rabbitmq_queue_type: Literal["quorum", "classic"] = Field(
        "quorum", validation_alias=_env("AVATARQ_RABBITMQ_QUEUE_TYPE")
    )

    # --- Sources -------------------------------------------------------------------------------
    #: S3-compatible store (credentials: boto3's own variables and files).
    s3_endpoint_url: str | None = Field(
        None, validation_alias=_env("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
    )
    aws_region: str | None = Field(None, validation_alias=_env("AWS_REGION", "AWS_DEFAULT_REGION"))
    #: Comma-separated hosts (`*.cdn.example.com` wildcards) http(s) sources may use; empty: any.
    source_hosts: str = Field("", validation_alias=_env("AVATARQ_SOURCE_HOSTS"))
    #: Allow http(s) sources on private, loopback and link-local addresses (SSRF guard).
    allow_private_sources: bool = Field(
        False, validation_alias=_env("AVATARQ_ALLOW_PRIVATE_SOURCES")
    )
    #: ffmpeg binary; default `ffmpeg` on PATH, else imageio-ffmpeg's.
    ffmpeg_binary: str | None = Field(None, validation_alias=_env("AVATARQ_FFMPEG"))
    #: Longest audio accepted (s); also bounds a job's time budget.
    max_job_duration_s: float = Field(
        3600.0, gt=0, validation_alias=_env("AVATARQ_MAX_JOB_DURATION")
    )

    # --- Recordings (docs/recordings.md) -------------------------------------------------------
    #: Where a job's `record: true` stores its MP4: `s3://bucket/prefix/` or a local directory.
    recordings: str | None = Field(None, validation_alias=_env("AVATARQ_RECORDINGS"))
    #: Comma-separated buckets a job's own `record: s3://bucket/…` may name (besides the
    #: bucket of `recordings`): a job must not make the worker write where it likes.
    recording_buckets: str = Field("", validation_alias=_env("AVATARQ_RECORDING_BUCKETS"))
    #: What records: `local`, a subscriber process per recorded job beside the worker, or
    #: `egress`, the Egress service of `AVATARQ_EGRESS_URL` (which alone selects nothing).
    recording_backend: Literal["local", "egress"] = Field(
        "local", validation_alias=_env("AVATARQ_RECORDING_BACKEND")
    )
    #: The recording's constant video frame rate (the avatar's frames are held or dropped).
    recording_fps: int = Field(25, ge=1, le=60, validation_alias=_env("AVATARQ_RECORDING_FPS"))

    # --- Worker --------------------------------------------------------------------------------
    #: Seconds the sender may run ahead of real time.
    default_lead_s: float = Field(0.5, validation_alias=_env("AVATARQ_DEFAULT_LEAD"))
    #: Jobs one worker process plays at once.
    worker_concurrency: int = Field(16, validation_alias=_env("AVATARQ_WORKER_CONCURRENCY"))
    #: Transient-fault retries, exponential backoff with full jitter (base, cap in s).
    max_retries: int = Field(4, ge=0, validation_alias=_env("AVATARQ_MAX_RETRIES"))
    retry_base_s: float = Field(2.0, gt=0, validation_alias=_env("AVATARQ_RETRY_BASE"))
    retry_cap_s: float = Field(60.0, gt=0, validation_alias=_env("AVATARQ_RETRY_CAP"))
    #: On SIGTERM, seconds playing jobs may finish before they are handed back.
    shutdown_grace_s: float = Field(30.0, ge=0, validation_alias=_env("AVATARQ_SHUTDOWN_GRACE"))
    #: Let the LiveKit SDK forward its native logs into Python (costly; tasks/compat.py).
    livekit_log_capture: bool = Field(False, validation_alias=_env("AVATARQ_LIVEKIT_LOG_CAPTURE"))
    #: Benchmarks (avatarq bench): results carry every audio chunk's schedule error.
    pacing_trace: bool = Field(False, validation_alias=_env("AVATARQ_PACING_TRACE"))

    # --- Reporting and operations --------------------------------------------------------------
    #: Redis stream of every job's events, its cap, and how long a job's own stream lives (s).
    events_stream: str = Field(EVENTS_STREAM, validation_alias=_env("AVATARQ_EVENTS_STREAM"))
    events_maxlen: int = Field(100_000, validation_alias=_env("AVATARQ_EVENTS_MAXLEN"))
    events_ttl_s: int = Field(7 * 24 * 3600, gt=0, validation_alias=_env("AVATARQ_EVENTS_TTL"))
    #: Signs webhooks; empty: unsigned.
    webhook_secret: SecretStr = Field(
        SecretStr(""), validation_alias=_env("AVATARQ_WEBHOOK_SECRET")
    )
    #: The webhooks' SSRF guard, like the sources' (hosts allowlist, private addresses).
    webhook_hosts: str = Field("", validation_alias=_env("AVATARQ_WEBHOOK_HOSTS"))
    allow_private_webhooks: bool = Field(
        False, validation_alias=_env("AVATARQ_ALLOW_PRIVATE_WEBHOOKS")
    )
    #: Prometheus /metrics port of each worker process (0 disables).
    metrics_port: int = Field(9808, ge=0, le=65535, validation_alias=_env("AVATARQ_METRICS_PORT"))
    #: "auto": JSON lines unless the log stream is a terminal.
    log_format: Literal["auto", "json", "text"] = Field(
        "auto", validation_alias=_env("AVATARQ_LOG_FORMAT")
    )

    # --- Producers: schedules and the HTTP API ---------------------------------------------------
    #: The schedule file `celery -A producers.beat beat` runs.
    schedule_file: str | None = Field(None, validation_alias=_env("AVATARQ_SCHEDULE_FILE"))
    #: Comma-separated `tenant:key` entries of the HTTP API.
    api_keys: SecretStr = Field(SecretStr(""), validation_alias=_env("AVATARQ_API_KEYS"))
    api_max_body_bytes: int = Field(
        64 * 1024, gt=0, validation_alias=_env("AVATARQ_API_MAX_BODY_BYTES")
    )

    # --- TTS pre-generation (producer side: rendered once, stored, enqueued as plain audio) ---
    tts_max_chars: int = Field(5000, gt=0, validation_alias=_env("AVATARQ_TTS_MAX_CHARS"))
    #: Store rendered speech in S3 (`s3://bucket/prefix<sha256>.ext`), else in `tts_cache_dir`.
    tts_bucket: str | None = Field(None, validation_alias=_env("AVATARQ_TTS_BUCKET"))
    tts_prefix: str = Field("tts/", validation_alias=_env("AVATARQ_TTS_PREFIX"))
    tts_cache_dir: Path = Field(
        Path("~/.cache/avatarq/tts"), validation_alias=_env("AVATARQ_TTS_CACHE_DIR")
    )
    #: Seconds per engine call, and calls per render (5xx, 429, timeouts).
    tts_timeout_s: float = Field(60.0, gt=0, validation_alias=_env("AVATARQ_TTS_TIMEOUT"))
    tts_attempts: int = Field(3, ge=1, validation_alias=_env("AVATARQ_TTS_ATTEMPTS"))
    espeak_binary: str = Field("espeak-ng", validation_alias=_env("AVATARQ_ESPEAK"))
    openai_tts_url: str = Field(
        "https://api.openai.com", validation_alias=_env("AVATARQ_OPENAI_TTS_URL")
    )
    openai_api_key: SecretStr = Field(SecretStr(""), validation_alias=_env("OPENAI_API_KEY"))
    openai_tts_model: str = Field(
        "gpt-4o-mini-tts", validation_alias=_env("AVATARQ_OPENAI_TTS_MODEL")
    )
    elevenlabs_url: str = Field(
        "https://api.elevenlabs.io", validation_alias=_env("AVATARQ_ELEVENLABS_URL")
    )
    elevenlabs_api_key: SecretStr = Field(
        SecretStr(""), validation_alias=_env("ELEVEN_API_KEY", "ELEVENLABS_API_KEY")
    )
    elevenlabs_model: str = Field(
        "eleven_multilingual_v2", validation_alias=_env("AVATARQ_ELEVENLABS_MODEL")
    )

    @model_validator(mode="after")
    def _relations(self) -> Settings:
        """Settings that are each valid but contradict one another fail at start, by name."""
        if self.visibility_timeout_s is not None and (
            self.visibility_timeout_s <= self.max_job_duration_s
        ):
            raise ValueError(
                f"AVATARQ_VISIBILITY_TIMEOUT ({self.visibility_timeout_s:g}s) must exceed "
                f"AVATARQ_MAX_JOB_DURATION ({self.max_job_duration_s:g}s): a broker would hand a "
                "playing job to a second worker"
            )
        if self.retry_base_s > self.retry_cap_s:
            raise ValueError(
                f"AVATARQ_RETRY_BASE ({self.retry_base_s:g}s) is above AVATARQ_RETRY_CAP "
                f"({self.retry_cap_s:g}s)"
            )
        if self.recording_backend == "egress" and not self.egress_url:
            raise ValueError(
                "AVATARQ_RECORDING_BACKEND=egress needs AVATARQ_EGRESS_URL: the LiveKit server "
                "whose Egress service records the jobs"
            )
        bad = [name for name in self.avatar_servers if not _SERVER_NAME.match(name)]
        if bad:
            raise ValueError(
                f"AVATARQ_AVATAR_SERVERS: {', '.join(map(repr, bad))} cannot be named by a job "
                "(letters, digits and _.:@=- only)"
            )
        return self

    @property
    def redelivery_after_s(self) -> float:
        """The broker's visibility timeout: an unacknowledged job (its worker died) is handed
        to another worker after this long, so it must exceed the longest job."""
        return self.visibility_timeout_s or self.max_job_duration_s + 600

    def avatar_server(self, name: str | None) -> AvatarServer:
        """The configured server a job names (`None`: the default one); `KeyError` naming
        the configured ones when there is no such server."""
        servers = self.configured_avatar_servers()
        name = name or DEFAULT_AVATAR_SERVER
        try:
            return servers[name].model_copy(update={"name": name})
        except KeyError:
            known = ", ".join(sorted(servers))
            raise KeyError(
                f"no avatar server named {name!r} is configured (known: {known})"
            ) from None

    def configured_avatar_servers(self) -> dict[str, AvatarServer]:
        default = AvatarServer(
            url=HttpUrl(self.avaluma_api_url), max_sessions=self.avaluma_max_sessions
        )
        return {DEFAULT_AVATAR_SERVER: default, **self.avatar_servers}

    def session_quotas(self) -> dict[str, int]:
        """Each configured avatar server's session quota, as this process announces it with
        its heartbeat (the fleet keeps to the smallest a live process announced)."""
        return {name: s.max_sessions for name, s in self.configured_avatar_servers().items()}

    def avatar_license_key(self, server: AvatarServer) -> str:
        key = server.license_key or self.avaluma_license_key
        return key.get_secret_value()

    @property
    def broker_url(self) -> str:
        return self.celery_broker_url or self.redis_url

    @property
    def result_backend(self) -> str:
        return self.celery_result_backend or self.redis_url


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once."""
    return Settings()
