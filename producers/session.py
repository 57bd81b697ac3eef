"""`Client`: the producer API as an explicit object holding its settings.

The module functions of `producers` (`enqueue`, `get_status`, ...) read the process's
settings; a service that talks to several avatarq deployments, or that wants its settings
passed in from where it starts (tests, a web app's factory), holds one `Client` per
deployment instead. Both paths run the same code.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from avatarq.jobs import Job
from avatarq.settings import Settings, get_settings
from producers import client, deadletter
from producers.client import JobHandle


class Client:
    """Enqueue, follow and cancel jobs of one avatarq deployment (`settings`)."""

    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings or get_settings()

    def enqueue(self, job: Job | Mapping[str, Any]) -> JobHandle:
        """Validate (renders `tts` sources first) and send one job; idempotent by job id."""
        return client.enqueue(job, settings=self.settings)

    def enqueue_many(self, jobs: Iterable[Job | Mapping[str, Any]]) -> list[JobHandle]:
        """All or nothing: every job is validated before the first is sent."""
        return client.enqueue_many(jobs, settings=self.settings)

    def get_status(self, job_id: str) -> dict[str, Any]:
        return client.get_status(job_id, settings=self.settings)

    def cancel(self, job_id: str) -> str:
        return client.cancel(job_id, settings=self.settings)

    def avatar_capacity(self) -> list[dict[str, Any]]:
        """Sessions, quota and waiting jobs of each configured avatar server."""
        return client.avatar_capacity(self.settings)

    def dead_letters(self, limit: int = 1000) -> list[dict[str, Any]]:
        return deadletter.list_dead(settings=self.settings, limit=limit)

    def retry_dead(self, job_id: str) -> JobHandle:
        return deadletter.retry_dead(job_id, settings=self.settings)
