"""A job's time limits, computed in one place: the playback's timeout, the room's hold."""

from __future__ import annotations

from avatarq.jobs import Job
from avatarq.settings import Settings

#: Time allowed on top of the audio itself for joining, avatar start and the final report.
OVERHEAD_BUDGET_S = 60.0


def length_limit(job: Job, settings: Settings) -> float:
    """The longest audio the job may play: its own `max_duration`, else the worker's cap."""
    return job.max_duration or settings.max_job_duration_s


def time_budget(job: Job, audio_seconds: float | None, settings: Settings) -> float:
    """The job's whole time limit: its audio plus joining, avatar start and reporting."""
    length = audio_seconds or length_limit(job, settings)
    waits = settings.avatar_join_timeout_s + settings.playback_finished_timeout_s
    return length + waits + OVERHEAD_BUDGET_S


def room_hold(job: Job, audio_seconds: float | None, settings: Settings) -> float:
    """How long the worker may stay in the job's room: the job, then the warm idle window."""
    return time_budget(job, audio_seconds, settings) + settings.warm_idle_s
