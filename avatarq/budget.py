"""A job's limits, computed once from the job and the settings: how long its audio may be,
how long the whole play may take, how long its room must stay open, how far ahead it sends."""

from __future__ import annotations

from dataclasses import dataclass

from avatarq.jobs import Job
from avatarq.settings import Settings

#: Time allowed on top of the audio itself for joining, avatar start and the final report.
OVERHEAD_BUDGET_S = 60.0


@dataclass(frozen=True)
class Budget:
    #: The longest audio the job may play: its own `max_duration`, else the worker's cap.
    max_length: float
    #: The avatar's join and playback-report timeouts, added to every play.
    waits: float
    #: How long a link stays warm after the job, for the room's next one.
    warm_idle: float
    #: Seconds of audio the avatar holds ahead of its playhead.
    lead: float

    @classmethod
    def of(cls, job: Job, settings: Settings) -> Budget:
        return cls(
            max_length=job.max_duration or settings.max_job_duration_s,
            waits=settings.avatar_join_timeout_s + settings.playback_finished_timeout_s,
            warm_idle=settings.warm_idle_s,
            lead=settings.default_lead_s if job.lead is None else job.lead,
        )

    def time_limit(self, audio_seconds: float | None) -> float:
        """The whole play's limit: its audio (the longest allowed while unknown) plus
        joining, avatar start and reporting."""
        return (audio_seconds or self.max_length) + self.waits + OVERHEAD_BUDGET_S

    def room_hold(self, audio_seconds: float | None) -> float:
        """How long the worker may stay in the job's room: the play, then the warm window."""
        return self.time_limit(audio_seconds) + self.warm_idle
