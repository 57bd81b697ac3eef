"""Jobs that exhausted their retries: list them, replay them, or drop them.

Workers keep an entry (the job, its last reason and error, attempts, time) in the ledger's
dead-letter list (`Ledger.dead_letter`); this is the operator's side of it (`avatarq dead
list|retry|purge`).
"""

from __future__ import annotations

from typing import Any

from avatarq.settings import Settings, get_settings
from producers.client import JobHandle, enqueue, ledger_for


def list_dead(*, settings: Settings | None = None, limit: int = 1000) -> list[dict[str, Any]]:
    """Dead-lettered jobs, newest first."""
    return ledger_for(settings or get_settings()).dead_letters(limit)


def retry_dead(job_id: str, *, settings: Settings | None = None) -> JobHandle:
    """Enqueue a dead-lettered job again under its own id, as a fresh job (attempts from 1)."""
    s = settings or get_settings()
    return ledger_for(s).replay_dead(job_id, lambda job: enqueue(job, settings=s))


def purge_dead(job_id: str | None = None, *, settings: Settings | None = None) -> int:
    """Drop one dead-lettered job, or all of them; returns how many were dropped."""
    return ledger_for(settings or get_settings()).purge_dead(job_id)
