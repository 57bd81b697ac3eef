"""The worker's Celery app: `celery -A tasks worker` finds it as `tasks.app`."""

from __future__ import annotations

import logging

from celery import Celery

from avatarq.celeryconfig import celery_config
from avatarq.settings import get_settings

app = Celery("avatarq")
app.conf.update(celery_config(get_settings()))
app.conf.imports = ["tasks.render"]


def quiet_livekit_logs() -> None:
    """The SDK forwards Rust/libwebrtc logs into Python; at debug levels that is a hex dump per
    SCTP packet, costing more CPU than streaming. Keep them at WARNING unless asked."""
    for name in ("livekit", "livekit.rtc"):
        logging.getLogger(name).setLevel(logging.WARNING)


quiet_livekit_logs()
