"""Enqueue side of avatarq: light (no LiveKit, no ffmpeg), for backend services and CLIs."""

from avatarq.jobs import Job, parse_job
from avatarq.results import Cancelled, Failed, JobResult, Played, parse_result
from producers.client import JobHandle, cancel, enqueue, enqueue_many, get_status
from producers.session import Client

__all__ = [
    "Cancelled",
    "Client",
    "Failed",
    "JobResult",
    "Played",
    "parse_result",
    "Job",
    "JobHandle",
    "cancel",
    "enqueue",
    "enqueue_many",
    "get_status",
    "parse_job",
]
