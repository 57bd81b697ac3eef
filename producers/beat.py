"""The beat app: `celery -A producers.beat beat` fires the announcements of the schedule file
named by `AVATARQ_SCHEDULE_FILE`.

On celery-redbeat a second beat waits for the lock as a standby, and each fire's job id comes
from the announcement's name and slot, so no slot plays twice (docs/usage.md)."""

from __future__ import annotations

from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

from celery import Celery
from celery.result import AsyncResult
from redbeat import RedBeatScheduler
from redbeat.schedulers import RedBeatSchedulerEntry

from avatarq.celeryconfig import RENDER_TASK, celery_config
from avatarq.ledger.keys import BEAT_KEY_PREFIX, BEAT_LOCK_KEY
from avatarq.settings import get_settings
from producers.client import enqueue
from producers.schedules import Announcement, load_schedule

#: Beat wakes at least this often; the standby also retries the lock at this pace.
MAX_LOOP_INTERVAL_S = 5
#: A dead beat's lock expires after this, letting a standby take over.
LOCK_TIMEOUT_S = 5 * MAX_LOOP_INTERVAL_S


@lru_cache(maxsize=1)
def announcements() -> dict[str, Announcement]:
    """The schedule file's announcements, read once, when beat starts (not at import)."""
    path = get_settings().schedule_file
    if not path:
        raise RuntimeError("set AVATARQ_SCHEDULE_FILE to the schedule file beat should run")
    return {a.name: a for a in load_schedule(path)}


class AnnouncementEntry(RedBeatSchedulerEntry):  # type: ignore[misc]
    """A redbeat entry whose schedule comes from the file, not from Redis: redbeat stores a
    cron entry as a plain crontab, which would lose the announcement's own timezone."""

    def __init__(self, name: str | None = None, *args: Any, **kwargs: Any) -> None:
        announcement = announcements().get(str(name))
        if announcement is not None:
            kwargs["schedule"] = announcement.celery_schedule()
        super().__init__(name, *args, **kwargs)


class AnnouncementScheduler(RedBeatScheduler):  # type: ignore[misc]
    Entry = AnnouncementEntry

    def setup_schedule(self) -> None:
        self.app.conf.beat_schedule = {
            a.name: {"task": RENDER_TASK, "schedule": a.celery_schedule()}
            for a in announcements().values()
        }
        super().setup_schedule()

    def apply_async(
        self, entry: AnnouncementEntry, producer: Any = None, advance: bool = True, **kwargs: Any
    ) -> AsyncResult:
        announcement = announcements().get(entry.name)
        if announcement is None:  # an entry someone added to Redis by hand: plain beat rules
            return super().apply_async(entry, producer, advance, **kwargs)
        if advance:
            self.reserve(entry)
        # Through the producer API, so the job is validated and sent exactly like any other.
        return enqueue(announcement.job_at(datetime.now(UTC))).result


def _beat_config() -> dict[str, Any]:
    settings = get_settings()
    return {
        **celery_config(settings),
        "timezone": "UTC",
        "beat_scheduler": f"{__name__}:AnnouncementScheduler",
        "beat_max_loop_interval": MAX_LOOP_INTERVAL_S,
        "redbeat_redis_url": settings.redis_url,
        "redbeat_key_prefix": BEAT_KEY_PREFIX,
        "redbeat_lock_key": BEAT_LOCK_KEY,
        "redbeat_lock_timeout": LOCK_TIMEOUT_S,
    }


# Configured when `celery beat` first reads its configuration, not at import.
app = Celery("avatarq-beat")
app.add_defaults(_beat_config)
