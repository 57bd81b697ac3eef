"""Bulk manifests: every row validated with its line number (CSV and JSONL), and
`avatarq enqueue-many` against a real Redis broker (all or nothing, or --skip-invalid)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import redis

from avatarq.celeryconfig import RENDER_QUEUE
from producers.manifest import ManifestError, load_manifest
from tests.producing import avatarq, own_db, queued_job_ids

CSV = """\
room,avatar_id,source,lead,metadata,job_id
lobby,anna,s3://clips/a.mp3,0.3,"{""campaign"": ""spring""}",bulk-a
lobby,,ftp://host/b.wav,99,,bulk-b
lobby,anna,"/clips/with
newline.wav",,,bulk-c

lobby,anna,/clips/d.wav,,{not json,bulk-d
lobby,anna,/clips/e.wav,,,bulk-a
lobby,anna
"""

JSONL = """\
{"room": "lobby", "avatar_id": "anna", "source": "s3://clips/a.mp3", "job_id": "j-a"}
{"room": "lobby", "avatar_id": "anna", "source": "/clips/b.wav", "lead": 99}

{"room": "lobby", "avatar_id": "anna", "source": "/clips/c.wav", "colour": "blue"}
not json
["a list"]
{"room": "lobby", "avatar_id": "anna", "source": "https://cdn.example/e.wav"}
"""


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_csv_rows_are_validated_with_line_numbers(tmp_path: Path) -> None:
    m = load_manifest(write(tmp_path, "jobs.csv", CSV))
    assert [(line, job.job_id) for line, job in m.jobs] == [(2, "bulk-a"), (4, "bulk-c")]
    assert m.jobs[0][1].metadata == {"campaign": "spring"}
    assert m.jobs[1][1].source == "/clips/with\nnewline.wav"  # a quoted cell spans two lines
    bad = {b.line: dict(b.errors) for b in m.invalid}
    assert set(bad) == {3, 7, 8, 9}
    assert set(bad[3]) == {"avatar_id", "source", "lead"}
    assert "not JSON" in bad[7]["metadata"]
    assert bad[8] == {"job_id": "duplicate of line 2"}
    assert "has 2 cells" in bad[9]["row"]


def test_csv_unknown_column_is_fatal(tmp_path: Path) -> None:
    path = write(
        tmp_path, "jobs.csv", "room,avatar_id,source,sampel_rate\nlobby,anna,a.wav,16000\n"
    )
    with pytest.raises(ManifestError, match="line 1: unknown column.*'sampel_rate'"):
        load_manifest(path)


def test_jsonl_rows_are_validated_with_line_numbers(tmp_path: Path) -> None:
    m = load_manifest(write(tmp_path, "jobs.jsonl", JSONL))
    assert [line for line, _job in m.jobs] == [1, 7]
    bad = {b.line: dict(b.errors) for b in m.invalid}
    assert set(bad) == {2, 4, 5, 6}
    assert "less than or equal to 30" in bad[2]["lead"]
    assert "Extra inputs" in bad[4]["colour"]
    assert "json" in bad[5] and bad[6] == {"job": "must be a JSON object"}


def enqueue_many(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return avatarq("enqueue-many", *args, env={"REDIS_URL": url})


def test_enqueue_many_is_all_or_nothing(tmp_path: Path, redis_server: str) -> None:
    url = own_db(redis_server, 2)
    client = redis.Redis.from_url(url)
    path = write(tmp_path, "jobs.csv", CSV)

    refused = enqueue_many(url, str(path))
    assert refused.returncode == 2
    assert "jobs.csv line 3: avatar_id: Field required" in refused.stderr
    assert "jobs.csv line 9:" in refused.stderr and "nothing enqueued: 4 invalid" in refused.stderr
    assert client.llen(RENDER_QUEUE) == 0

    done = enqueue_many(url, str(path), "--skip-invalid", "--json")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["enqueued"] == 2 and [b["line"] for b in summary["invalid"]] == [3, 7, 8, 9]
    assert sorted(queued_job_ids(client)) == ["bulk-a", "bulk-c"]


def test_a_row_refused_as_it_is_prepared_stops_the_whole_batch(
    tmp_path: Path, redis_server: str
) -> None:
    # Valid by the schema, refused by the SSRF policy: found before the first row is sent.
    url = own_db(redis_server, 2)
    client = redis.Redis.from_url(url)
    rows = [
        {"room": "lobby", "avatar_id": "anna", "source": "s3://clips/a.mp3", "job_id": "prep-a"},
        {"room": "lobby", "avatar_id": "anna", "source": "http://10.0.0.8/b.wav"},
    ]
    path = write(tmp_path, "prep.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    refused = enqueue_many(url, str(path))
    assert refused.returncode == 2, refused.stderr
    assert "prep.jsonl line 2: source:" in refused.stderr and "private address" in refused.stderr
    assert client.llen(RENDER_QUEUE) == 0
    done = enqueue_many(url, str(path), "--skip-invalid", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["job_ids"] == ["prep-a"]


def test_enqueue_many_jsonl_sends_every_row(tmp_path: Path, redis_server: str) -> None:
    url = own_db(redis_server, 2)
    client = redis.Redis.from_url(url)
    rows = [{"room": "lobby", "avatar_id": "anna", "source": f"/clips/{i}.wav"} for i in range(5)]
    path = write(tmp_path, "jobs.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    done = enqueue_many(url, str(path), "--json")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["enqueued"] == 5 and sorted(queued_job_ids(client)) == sorted(summary["job_ids"])
