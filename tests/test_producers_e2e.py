"""Bulk and HTTP enqueue end to end on the local stack: jobs played by a real worker through
the local LiveKit server and the avatar emulator. Runs inside the private network namespace."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from avatarq_dev.processes import ManagedProcess
from avatarq_dev.stack import LocalStack, local_stack
from tests import audio
from tests.netns import NETNS
from tests.producing import avatarq
from tests.test_api import AUTH, sse_frames, start_api

pytestmark = NETNS


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    with local_stack(tmp_path_factory.mktemp("stack"), workers=1, concurrency=4) as s:
        yield s


def test_enqueue_many_waits_for_the_whole_batch(stack: LocalStack, tmp_path: Path) -> None:
    rows = [
        {
            "room": f"bulk-{i}",
            "avatar_id": "anna",
            "source": str(audio.tone(tmp_path / f"{i}.wav", seconds=1.0)),
        }
        for i in range(2)
    ]
    manifest = tmp_path / "jobs.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    done = avatarq(
        "enqueue-many", str(manifest), "--wait", "--timeout", "90", "--json", env=stack.env()
    )
    assert done.returncode == 0, done.stderr + "\n".join(w.tail(40) for w in stack.workers)
    summary = json.loads(done.stdout)
    assert (summary["enqueued"], summary["completed"], summary["failed"]) == (2, 2, 0)
    assert summary["pending"] == 0 and summary["problems"] == []


def test_api_streams_the_events_of_a_played_job(stack: LocalStack, tmp_path: Path) -> None:
    # Remote producers give URLs, not paths: serve the clip over HTTP.
    audio.tone(tmp_path / "hello.wav", seconds=1.5)
    files = ManagedProcess(
        "files",
        lambda ports: (
            [sys.executable, "-m", "http.server", str(ports[0]), "--bind", "127.0.0.1"]
            + ["--directory", str(tmp_path)]
        ),
        ports=["tcp"],
    )
    api_proc, api = start_api(stack.env(), tmp_path / "logs")
    with files, api_proc:
        job = {
            "job_id": "api-e2e-1",
            "room": "api-e2e",
            "avatar_id": "anna",
            "source": f"http://127.0.0.1:{files.port}/hello.wav",
        }
        created = requests.post(f"{api}/jobs", json=job, headers=AUTH, timeout=10)
        assert created.status_code == 201, created.text
        url = f"{api}/jobs/api-e2e-1/events?timeout=90"
        with requests.get(url, headers=AUTH, stream=True, timeout=120) as res:
            frames = sse_frames(res)
        status = requests.get(f"{api}/jobs/api-e2e-1", headers=AUTH, timeout=10).json()
    names = [f["event"] for f in frames]
    assert names[0] == "job.started" and names[-1] == "job.completed", names
    assert "job.avatar_ready" in names and "job.progress" in names
    assert all(f["data"]["job_id"] == "api-e2e-1" for f in frames)
    assert status["status"] == "completed", status
    assert status["seconds_streamed"] == pytest.approx(1.5, abs=0.01)
    # The tenant's room is its own in LiveKit: the avatar played in `acme:api-e2e`, never in
    # the room another tenant (or a Python producer) calls `api-e2e`; the tenant sees its name.
    assert status["room"] == "api-e2e" and {f["data"].get("room") for f in frames} <= {
        "api-e2e",
        None,
    }
    sessions = f"{stack.avatar_url}/v1/sessions"
    played = requests.get(sessions, params={"room": "acme:api-e2e"}, timeout=10).json()
    heard = sum(s["received_audio_s"] for s in played)
    assert played and heard == pytest.approx(1.5, abs=0.1), played
    for room in ("api-e2e", "globex:api-e2e"):
        assert requests.get(sessions, params={"room": room}, timeout=10).json() == []
