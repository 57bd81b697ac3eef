"""`producers.Client` uses the settings it was given, not the process's."""

from __future__ import annotations

import pytest

from avatarq.settings import Settings, get_settings
from producers import Client


def test_client_talks_to_its_own_deployment(
    redis_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The process's own settings point nowhere: only the client's settings can work.
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:9/0")
    get_settings.cache_clear()
    try:
        c = Client(Settings(REDIS_URL=redis_server, AVATARQ_AVATAR_MAX_SESSIONS=4))
        handle = c.enqueue({"room": "lobby", "avatar_id": "anna", "source": "s3://b/k.wav"})
        assert handle.created
        assert (
            c.enqueue(
                {
                    "room": "lobby",
                    "avatar_id": "anna",
                    "source": "s3://b/k.wav",
                    "job_id": handle.job_id,
                }
            ).created
            is False
        )  # idempotent by id
        assert c.get_status(handle.job_id)["status"] == "queued"
        assert c.cancel(handle.job_id) == "queued"
        assert c.get_status(handle.job_id)["cancel_requested"] is True
        (default,) = c.avatar_capacity()
        assert (default["server"], default["quota"], default["sessions"]) == ("default", 4, 0)
        assert c.dead_letters() == []
    finally:
        get_settings.cache_clear()
