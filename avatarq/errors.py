"""Job errors: every failure names its reason and says whether a retry can help.

`reason` is a stable machine-readable code (it lands in results and events); the message is
for humans and never carries a secret or a stack trace.
"""

from __future__ import annotations


class JobError(Exception):
    """A job failed. Subclasses decide whether retrying may help."""

    permanent: bool = True
    reason: str = "job_error"

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
    reason = "permanent"


class TransientJobError(JobError):
    """A passing fault (network, 5xx, timeout): the job is retried with backoff."""

    permanent = False
    reason = "transient"


class InvalidJob(PermanentJobError):
    reason = "invalid_job"


class SourceNotFound(PermanentJobError):
    reason = "source_not_found"


class SourceUnavailable(TransientJobError):
    reason = "source_unavailable"


class DecodeError(PermanentJobError):
    reason = "decode_error"


class AvatarRejected(PermanentJobError):
    reason = "avatar_rejected"


class AvatarUnavailable(TransientJobError):
    reason = "avatar_unavailable"


class AvatarTimeout(TransientJobError):
    reason = "avatar_timeout"


class RoomError(TransientJobError):
    reason = "room_error"


class LiveKitRejected(PermanentJobError):
    """The LiveKit server refused our credentials: a settings problem no retry fixes."""

    reason = "livekit_rejected"


class AvatarOverLimit(TransientJobError):
    """The avatar server refused a session with 429: its license is at its limit."""

    reason = "avatar_over_limit"
