"""Settings: avatar servers by name, and relations between settings checked at start."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from pydantic import ValidationError

from avatarq.settings import Settings


def test_default_avatar_server_comes_from_avaluma_settings() -> None:
    s = Settings(AVALUMA_API_URL="https://avatars.example", AVATARQ_AVATAR_MAX_SESSIONS=3)
    server = s.avatar_server(None)
    assert server.base_url == "https://avatars.example" and server.max_sessions == 3
    assert server.sample_rate == 16000


def test_named_servers_carry_their_own_rate_and_license(monkeypatch: pytest.MonkeyPatch) -> None:
    servers = {"eu": {"url": "https://eu.example", "sample_rate": 24000, "license_key": "k-eu"}}
    monkeypatch.setenv("AVATARQ_AVATAR_SERVERS", json.dumps(servers))  # as operators set it
    monkeypatch.setenv("AVALUMA_LICENSE_KEY", "k-main")
    s = Settings()
    eu = s.avatar_server("eu")
    assert eu.sample_rate == 24000 and s.avatar_license_key(eu) == "k-eu"
    assert s.avatar_license_key(s.avatar_server("default")) == "k-main"
    with pytest.raises(KeyError, match=r"no avatar server named 'us' .*known: default, eu"):
        s.avatar_server("us")


@pytest.mark.parametrize(
    ("env", "words"),
    [
        (
            {"AVATARQ_VISIBILITY_TIMEOUT": "600", "AVATARQ_MAX_JOB_DURATION": "3600"},
            "must exceed AVATARQ_MAX_JOB_DURATION",
        ),
        ({"AVATARQ_RETRY_BASE": "90", "AVATARQ_RETRY_CAP": "60"}, "above AVATARQ_RETRY_CAP"),
        (
            {"AVATARQ_AVATAR_SERVERS": json.dumps({"eu west": {"url": "https://eu.example"}})},
            "cannot be named by a job",
        ),
    ],
)
def test_contradicting_settings_fail_by_name(
    env: dict[str, str], words: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError, match=words):
        Settings()


def test_a_settings_error_never_echoes_the_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    # What the worker prints when it refuses to start: the problem, never the input.
    monkeypatch.setenv("LIVEKIT_API_SECRET", "s3cr3t-value")
    monkeypatch.setenv("AVALUMA_LICENSE_KEY", "lic-3nse-value")
    monkeypatch.setenv("AVATARQ_RETRY_BASE", "90")
    monkeypatch.setenv("AVATARQ_RETRY_CAP", "60")
    with pytest.raises(ValidationError, match="above AVATARQ_RETRY_CAP") as info:
        Settings()
    # pydantic echoes a truncated repr of the whole input otherwise: a secret's first letters.
    shown = str(info.value)
    assert "input_value" not in shown and "LIVEKIT_API_SECRET" not in shown


@pytest.mark.parametrize("module", ["tasks.app", "producers.beat"])
def test_importing_an_app_reads_no_settings(module: str) -> None:
    # Settings that cannot validate: importing the Celery app must not read them; the first
    # read of its configuration (the worker's or beat's start) must, and fail by name.
    env = {**os.environ, "AVATARQ_RETRY_BASE": "100", "AVATARQ_RETRY_CAP": "1"}
    imported = subprocess.run(
        [sys.executable, "-c", f"import {module}"], env=env, capture_output=True, text=True
    )
    assert imported.returncode == 0, imported.stderr
    configured = subprocess.run(
        [sys.executable, "-c", f"from {module} import app; app.conf.broker_url"],
        env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert configured.returncode != 0 and "AVATARQ_RETRY_BASE" in configured.stderr
