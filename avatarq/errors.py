"""Job errors: every failure names its reason and says whether a retry can help.

`reason` is a stable machine-readable code (it lands in results and events); the message is
for humans and never carries a secret or a stack trace. The tree (a job's run retries a
`TransientJobError` with backoff while attempts are left, and fails a `PermanentJobError`
at once, tasks/jobrun.py):

    JobError
     ├── PermanentJobError      retrying the same job cannot succeed
     │    ├── InvalidJob            invalid_job, unknown_avatar_server, source_not_allowed, …
     │    ├── SourceNotFound        source_not_found
     │    ├── DecodeError           invalid_audio, no_audio, too_long, truncated_audio, …
     │    ├── AvatarRejected        avatar_rejected (401/403/404/422 from the avatar server)
     │    └── LiveKitRejected       livekit_rejected (the LiveKit credentials were refused)
     └── TransientJobError      the same job may succeed later
          ├── SourceUnavailable     source_unavailable
          │    └── SourceStalled        source_stalled (no data long enough to risk the avatar)
          ├── AvatarUnavailable     avatar_unavailable (5xx, connection errors)
          ├── AvatarTimeout         avatar_timeout, avatar_not_listening, avatar_left
          ├── RoomError             room_error
          ├── LeaseUnconfirmed      lease_unconfirmed (the ledger out of reach too long)
          └── AvatarOverLimit       avatar_over_limit (429: handed to the session quota)

Not errors but control flow: `tasks.control.Interrupted` (a stop on request) and
`tasks.link.quota.NoAvatarSlot` (come back later, not counted as an attempt).
"""

from __future__ import annotations

from enum import StrEnum


class Reason(StrEnum):
    """The stable reason codes of results, events and the dead-letter list."""

    #: the payload is not a valid job (each bad field named)
    INVALID_JOB = "invalid_job"
    #: the source is empty or malformed
    INVALID_SOURCE = "invalid_source"
    #: the source's URL scheme is not file, http(s) or s3
    UNSUPPORTED_SCHEME = "unsupported_scheme"
    #: the source's host or address is refused by the SSRF policy
    SOURCE_NOT_ALLOWED = "source_not_allowed"
    #: the webhook's host or address is refused by the SSRF policy
    WEBHOOK_NOT_ALLOWED = "webhook_not_allowed"
    #: the source does not exist (404, missing file or key)
    SOURCE_NOT_FOUND = "source_not_found"
    #: the job names an avatar server the worker's settings lack
    UNKNOWN_AVATAR_SERVER = "unknown_avatar_server"
    #: ffmpeg could not decode the source
    DECODE_ERROR = "decode_error"
    #: not an audio file, or corrupt data
    INVALID_AUDIO = "invalid_audio"
    #: a container without an audio stream
    NO_AUDIO_STREAM = "no_audio_stream"
    #: the audio decodes to zero samples
    NO_AUDIO = "no_audio"
    #: a container ffmpeg may not open (playlists and other indirections)
    FORMAT_NOT_ALLOWED = "format_not_allowed"
    #: a protocol ffmpeg may not follow
    PROTOCOL_NOT_ALLOWED = "protocol_not_allowed"
    #: the audio is longer than max_duration (declared or while decoding)
    TOO_LONG = "too_long"
    #: the file decodes clearly short of the length it declares
    TRUNCATED_AUDIO = "truncated_audio"
    #: the avatar server refused the start (a 4xx other than 408/409/425/429)
    AVATAR_REJECTED = "avatar_rejected"
    #: the LiveKit server refused the worker's credentials
    LIVEKIT_REJECTED = "livekit_rejected"
    #: the TTS engine refused the request
    TTS_REJECTED = "tts_rejected"
    #: the source could not be fetched now
    SOURCE_UNAVAILABLE = "source_unavailable"
    #: the source sent nothing for so long that the segment was ended (resumed on retry)
    SOURCE_STALLED = "source_stalled"
    #: ffmpeg could not be started
    FFMPEG_MISSING = "ffmpeg_missing"
    #: the avatar server did not start a session (5xx, 409, network)
    AVATAR_UNAVAILABLE = "avatar_unavailable"
    #: the avatar server is at its session limit (429): the job waits its turn
    AVATAR_OVER_LIMIT = "avatar_over_limit"
    #: the avatar never joined or never published video in time
    AVATAR_TIMEOUT = "avatar_timeout"
    #: the avatar's receiver never answered for this worker
    AVATAR_NOT_LISTENING = "avatar_not_listening"
    #: the avatar left the room mid-job
    AVATAR_LEFT = "avatar_left"
    #: the worker could not join, or lost, the LiveKit room
    ROOM_ERROR = "room_error"
    #: the worker could not confirm its lease long enough that the avatar would drop the stream
    LEASE_UNCONFIRMED = "lease_unconfirmed"
    #: the avatar played clearly less than it was sent (replayed once)
    INCOMPLETE_PLAYBACK = "incomplete_playback"
    #: the job overran its time limit (audio length plus start-up budget)
    JOB_TIMEOUT = "job_timeout"
    #: an unexpected error (logged with its trace)
    INTERNAL_ERROR = "internal_error"
    #: the TTS engine failed repeatedly (5xx, 429, timeouts)
    TTS_UNAVAILABLE = "tts_unavailable"
    #: rendered speech could not be stored
    TTS_STORAGE = "tts_storage"
    #: cancelled on request
    CANCELLED = "cancelled"
    #: streamed in full to a listening avatar that never reported playing it
    PLAYBACK_UNCONFIRMED = "playback_unconfirmed"
    #: a permanent error without a more precise code
    PERMANENT = "permanent"
    #: a transient error without a more precise code
    TRANSIENT = "transient"
    #: a job error without a more precise code
    JOB_ERROR = "job_error"


class JobError(Exception):
    """A job failed. Subclasses decide whether retrying may help."""

    permanent: bool = True
    reason: str = Reason.JOB_ERROR

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else self.reason


class PermanentJobError(JobError):
    """Bad input or a refusal: retrying the same job cannot succeed."""

    permanent = True
    reason = Reason.PERMANENT


class TransientJobError(JobError):
    """A passing fault (network, 5xx, timeout): the job is retried with backoff."""

    permanent = False
    reason = Reason.TRANSIENT


class IncompletePlayback(TransientJobError):
    """The avatar reported playing `heard_s` seconds of a segment it was sent more of: the
    retry resumes from there."""

    reason = Reason.INCOMPLETE_PLAYBACK

    def __init__(self, message: str, *, heard_s: float) -> None:
        super().__init__(message)
        self.heard_s = heard_s


class InvalidJob(PermanentJobError):
    reason = Reason.INVALID_JOB


class SourceNotFound(PermanentJobError):
    reason = Reason.SOURCE_NOT_FOUND


class SourceUnavailable(TransientJobError):
    reason = Reason.SOURCE_UNAVAILABLE


class SourceStalled(SourceUnavailable):
    """The source stopped delivering mid-play and the run-ahead buffer ran dry: the segment
    was ended cleanly before the avatar's idle timeout could cut it, to resume on retry."""

    reason = Reason.SOURCE_STALLED


class DecodeError(PermanentJobError):
    reason = Reason.DECODE_ERROR


class AvatarRejected(PermanentJobError):
    reason = Reason.AVATAR_REJECTED


class AvatarUnavailable(TransientJobError):
    reason = Reason.AVATAR_UNAVAILABLE


class AvatarTimeout(TransientJobError):
    reason = Reason.AVATAR_TIMEOUT


class RoomError(TransientJobError):
    reason = Reason.ROOM_ERROR


class LeaseUnconfirmed(TransientJobError):
    """The worker held its audio waiting to confirm its lease until the avatar would have
    ended the segment on its own: ended cleanly instead, to resume once the ledger answers."""

    reason = Reason.LEASE_UNCONFIRMED


class LiveKitRejected(PermanentJobError):
    """The LiveKit server refused our credentials: a settings problem no retry fixes."""

    reason = Reason.LIVEKIT_REJECTED


class AvatarOverLimit(TransientJobError):
    """The avatar server refused a session with 429: its license is at its limit."""

    reason = Reason.AVATAR_OVER_LIMIT
