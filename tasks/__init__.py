"""Worker side of avatarq: the Celery app and the render task (heavy: LiveKit, ffmpeg)."""

from tasks.app import app

__all__ = ["app"]
