"""The job schema: what producers may send, and the errors they get when it is wrong."""

from __future__ import annotations

import subprocess
import sys

import pytest

from avatarq.errors import InvalidJob
from avatarq.jobs import Job, parse_job

BASE = {"room": "lobby", "avatar_id": "anna", "source": "s3://clips/hello.mp3"}


def test_defaults_and_payload_roundtrip() -> None:
    job = parse_job(BASE)
    assert len(job.job_id) == 32 and job.avatar_server is None
    assert job.avatar_identity == "avatar-anna"
    again = parse_job(job.payload())
    assert again == job


@pytest.mark.parametrize(
    ("change", "field", "words"),
    [
        ({"colour": "red"}, "colour", "Extra inputs"),
        ({"room": ""}, "room", "pattern"),
        ({"room": "bad room/name"}, "room", "pattern"),
        ({"avatar_id": None}, "avatar_id", "string"),
        ({"source": "ftp://host/a.mp3"}, "source", "scheme 'ftp' is not supported"),
        ({"source": "s3://bucket-only"}, "source", "s3://bucket/key"),
        ({"sample_rate": 48000}, "sample_rate", "not a job option"),
        ({"avatar_server": "http://169.254.169.254/"}, "avatar_server", "never a URL"),
        ({"avatar_server": "eu west"}, "avatar_server", "pattern"),
        ({"lead": -1}, "lead", "greater than or equal"),
        ({"metadata": {"x": "y" * 20000}}, "metadata", "over the 16384 limit"),
        ({"webhook_url": "not a url"}, "webhook_url", "URL"),
        ({"max_duration": float("inf")}, "max_duration", "finite number"),
        ({"max_duration": float("nan")}, "max_duration", "finite number"),
        ({"lead": float("nan")}, "lead", "finite number"),
        ({"max_duration": 3601}, "max_duration", "AVATARQ_MAX_JOB_DURATION limit of 3600s"),
        ({"metadata": {"x": float("nan")}}, "metadata", "Out of range float values"),
    ],
)
def test_bad_fields_are_named(change: dict, field: str, words: str) -> None:
    with pytest.raises(InvalidJob) as exc:
        parse_job({**BASE, **change})
    message = exc.value.message
    assert message.startswith("invalid job: ") and f"{field}: " in message and words in message
    assert exc.value.permanent and exc.value.reason == "invalid_job"


def test_missing_fields_each_reported() -> None:
    with pytest.raises(InvalidJob) as exc:
        parse_job({"source": "a.wav"})
    assert "room: Field required" in exc.value.message
    assert "avatar_id: Field required" in exc.value.message


def test_non_object_payload() -> None:
    with pytest.raises(InvalidJob, match="must be a JSON object, not list"):
        parse_job(["a"])


def test_local_paths_and_urls_accepted() -> None:
    for source in ("clips/a.wav", "/abs/a.mp3", "file:///tmp/a.ogg", "https://cdn.example/a.m4a"):
        assert Job(**{**BASE, "source": source}).source == source


@pytest.mark.parametrize(
    ("source", "remote"),
    [
        ("clips/a.wav", False),
        ("file:///tmp/a.ogg", False),
        ({"type": "tts", "text": "Hello"}, False),
        ("https://cdn.example/a.m4a", True),
        (" HTTP://cdn.example/a.m4a", True),
        ("s3://bucket/a.wav", True),
    ],
)
def test_a_source_opened_over_the_network_is_remote(source: object, remote: bool) -> None:
    assert Job(**{**BASE, "source": source}).remote_source is remote


def test_producers_import_stays_light() -> None:
    code = (
        "import sys, producers; "
        "heavy = [m for m in sys.modules if m.split('.')[0] in "
        "('ffmpeg', 'aiortc', 'tasks') or m.startswith('livekit')]; "
        "print(heavy); sys.exit(1 if heavy else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
