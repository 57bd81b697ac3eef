"""Enqueue side of avatarq: light (no LiveKit, no ffmpeg), for backend services and CLIs."""

from producers.client import JobHandle, cancel, enqueue, enqueue_many, get_status
from producers.jobs import Job, parse_job

__all__ = ["Job", "JobHandle", "cancel", "enqueue", "enqueue_many", "get_status", "parse_job"]
