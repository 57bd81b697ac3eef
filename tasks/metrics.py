"""Prometheus metrics of a worker process, served on `AVATARQ_METRICS_PORT` (0 disables).

Fed from the job events (`observe`, called once from `JobReporter.emit`) so the pipeline keeps
one source of truth for what happened to a job; only pacing and streams in flight need a hook
in the pipeline itself, because no event carries them.
"""

from __future__ import annotations

import logging
import os
import time

from prometheus_client import Counter, Gauge, Histogram, start_http_server

from avatarq.events import EventPayload, JobStarted, Retrying, Status, WaitingForAvatar
from avatarq.results import Failed, JobResult, Played
from tasks.link.pacing import Pacer

log = logging.getLogger("avatarq.metrics")

#: Job lengths run from seconds to an hour.
DURATION_BUCKETS = (1, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200)
#: Start-up costs (join, avatar start, teardown) are seconds, tens at worst.
LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 3, 5, 8, 13, 20, 30, 60)
#: Pacing lateness: a healthy sender is within milliseconds; past the lead (0.5 s) the avatar
#: runs dry.
PACING_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)

JOBS_STARTED = Counter("avatarq_jobs_started", "Job attempts started")
JOBS_COMPLETED = Counter("avatarq_jobs_completed", "Jobs completed")
JOBS_FAILED = Counter("avatarq_jobs_failed", "Jobs failed for good, by reason", ["reason"])
JOB_RETRIES = Counter("avatarq_job_retries", "Attempts that will be retried, by reason", ["reason"])
JOB_DURATION = Histogram(
    "avatarq_job_duration_seconds",
    "Completed jobs: wall time from pick-up to the result",
    buckets=DURATION_BUCKETS,
)
JOB_OVERHEAD = Histogram(
    "avatarq_job_overhead_seconds",
    "Completed jobs: wall time minus the audio's length (join, avatar start, drain, teardown)",
    buckets=LATENCY_BUCKETS,
)
AVATAR_START = Histogram(
    "avatarq_avatar_start_seconds",
    "Completed jobs: room joined to the avatar's video published",
    buckets=LATENCY_BUCKETS,
)
PACING_ERROR = Histogram(
    "avatarq_pacing_error_seconds",
    "Per audio chunk: how long after its scheduled send time its write finished",
    buckets=PACING_BUCKETS,
)
STREAMS_IN_FLIGHT = Gauge(
    "avatarq_streams_in_flight", "Jobs of this process with a joined room right now"
)

AVATAR_WAITS = Counter(
    "avatarq_avatar_waits",
    "Cold starts that found every session slot of their avatar server taken",
    ["server"],
)
AVATAR_SESSIONS = Gauge(
    "avatarq_avatar_sessions",
    "Avatar sessions held across the fleet, as last seen by this process",
    ["server"],
)
AVATAR_QUOTA = Gauge(
    "avatarq_avatar_quota",
    "Effective session quota of the avatar server, as last seen by this process",
    ["server"],
)

_served_by: int | None = None


def observe(payload: EventPayload | JobResult) -> None:
    """Count one job event, as written to the Redis stream."""
    if isinstance(payload, JobStarted):
        JOBS_STARTED.inc()
    elif isinstance(payload, Retrying):
        JOB_RETRIES.labels(reason=payload.reason).inc()
    elif isinstance(payload, Failed):
        JOBS_FAILED.labels(reason=payload.reason).inc()
    elif isinstance(payload, Played) and payload.status == Status.COMPLETED:
        JOBS_COMPLETED.inc()
        _observe_completed(payload)
    elif isinstance(payload, WaitingForAvatar):
        AVATAR_WAITS.labels(server=payload.server).inc()
        AVATAR_SESSIONS.labels(server=payload.server).set(payload.sessions)
        AVATAR_QUOTA.labels(server=payload.server).set(payload.quota)


def _observe_completed(played: Played) -> None:
    ts = played.timestamps
    wall = time.time() - ts.picked
    JOB_DURATION.observe(wall)
    JOB_OVERHEAD.observe(max(0.0, wall - played.seconds_streamed))
    if ts.avatar_requested and ts.avatar_ready:
        AVATAR_START.observe(ts.avatar_ready - ts.avatar_requested)


class PacingProbe:
    """Feeds `avatarq_pacing_error_seconds` from the sender's progress callback: the chunk that
    ends at byte `sent` started at the previous call's `sent`, and was due at `pacer.due()`."""

    def __init__(self, pacer: Pacer) -> None:
        self.pacer = pacer
        self._chunk_start = 0

    def observe(self, sent: int) -> None:
        PACING_ERROR.observe(max(0.0, self.pacer.clock() - self.pacer.due(self._chunk_start)))
        self._chunk_start = sent


def serve(port: int) -> None:
    """Start the /metrics endpoint once per process (0 disables)."""
    global _served_by
    if port == 0 or _served_by == os.getpid():
        return
    start_http_server(port)
    _served_by = os.getpid()
    log.info("metrics on :%d/metrics", port)
