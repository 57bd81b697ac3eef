"""Schedule files: validation with line numbers, next fire times, and real `celery beat`
(celery-redbeat) processes firing a 2 s announcement into a real Redis broker."""

from __future__ import annotations

import json
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
import redis
from croniter import croniter
from redbeat.decoder import RedBeatJSONEncoder

from avatarq.celeryconfig import RENDER_QUEUE
from avatarq_dev.processes import ManagedProcess
from producers.schedules import ScheduleError, ZonedCron, load_schedule
from tests.producing import avatarq, own_db, queued_job_ids

GOOD = """\
timezone: Europe/Berlin
announcements:
  - name: opening
    cron: "30 8 * * mon-fri"
    job: {room: lobby, avatar_id: anna, source: "s3://clips/opening.mp3"}
  - name: heartbeat
    every: 2
    timezone: UTC
    job:
      room: lobby
      avatar_id: anna
      source: https://cdn.example/ping.wav
      metadata: {kind: heartbeat}
"""

BAD = """\
timezone: Mars/Olympus
announcements:
  - name: opening
    cron: "0 25 * * *"
    job: {room: lobby, avatar_id: anna, source: "s3://clips/opening.mp3"}
  - name: heartbeat
    every: 2
    timezone: Europe/Nowhere
    job:
      room: lobby
      source: ftp://host/ping.wav
      sample_rate: 7
  - name: opening
    every: 0.1
    colour: blue
    job: {room: a, avatar_id: b, source: x.wav, job_id: fixed}
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "schedule.yaml"
    path.write_text(text)
    return path


def test_every_problem_is_reported_with_line_and_field(tmp_path: Path) -> None:
    with pytest.raises(ScheduleError) as info:
        load_schedule(write(tmp_path, BAD))
    got = {(p.line, p.field) for p in info.value.problems}
    assert got == {
        (1, "timezone"),
        (4, "announcements[0].cron"),
        (8, "announcements[1].timezone"),
        (9, "announcements[1].job.avatar_id"),  # missing: reported at the `job:` key
        (11, "announcements[1].job.source"),
        (12, "announcements[1].job.sample_rate"),
        (13, "announcements[2].name"),
        (14, "announcements[2].every"),
        (15, "announcements[2].colour"),
        (16, "announcements[2].job.job_id"),
    }
    text = str(info.value)
    assert "Mars/Olympus" in text and "'0 25 * * *'" in text and "'ftp'" in text
    assert "duplicate of the announcement at line 3" in text


def test_cron_and_every_both_or_neither_is_an_error(tmp_path: Path) -> None:
    text = "announcements:\n  - name: x\n    job: {room: a, avatar_id: b, source: c.wav}\n"
    with pytest.raises(ScheduleError, match="line 2: announcements\\[0\\]: needs exactly one"):
        load_schedule(write(tmp_path, text))


def test_next_fire_times_are_in_the_schedules_timezone(tmp_path: Path) -> None:
    opening, heartbeat = load_schedule(write(tmp_path, GOOD))
    # Friday 2026-03-27 12:00 UTC; Berlin moves to summer time on Sunday 2026-03-29.
    after = datetime(2026, 3, 27, 12, 0, tzinfo=UTC)
    fires = opening.next_fires(3, after)
    assert [f.isoformat() for f in fires] == [
        "2026-03-30T08:30:00+02:00",
        "2026-03-31T08:30:00+02:00",
        "2026-04-01T08:30:00+02:00",
    ]
    assert [f.isoformat() for f in heartbeat.next_fires(2, after)] == [
        "2026-03-27T12:00:02+00:00",
        "2026-03-27T12:00:04+00:00",
    ]


def test_job_ids_derive_from_name_and_fire_slot(tmp_path: Path) -> None:
    opening, heartbeat = load_schedule(write(tmp_path, GOOD))
    # Any moment within one slot gives the same job: a double fire is one job id.
    a = heartbeat.job_at(datetime(2026, 3, 27, 12, 0, 4, 100, tzinfo=UTC))
    b = heartbeat.job_at(datetime(2026, 3, 27, 12, 0, 5, 999_000, tzinfo=UTC))
    assert a.job_id == b.job_id == "heartbeat-20260327T120004Z"
    assert a.metadata == {"kind": "heartbeat"} and a.room == "lobby"
    late = opening.job_at(datetime(2026, 3, 30, 6, 30, 7, tzinfo=UTC))  # 08:30:07 Berlin
    assert late.job_id == "opening-20260330T063000Z"
    # Fired less than a second before the next slot (beat catching up): still its own slot,
    # whose job id the next slot's fire must not find taken.
    caught_up = opening.job_at(datetime(2026, 3, 31, 6, 29, 59, 500_000, tzinfo=UTC))
    assert caught_up.job_id == "opening-20260330T063000Z"


def test_zoned_cron_is_due_in_its_own_timezone() -> None:
    zone = ZoneInfo("Pacific/Kiritimati")  # UTC+14: its 09:00 is never UTC's 09:00
    cron = ZonedCron("0 9 * * *", zone)
    now = datetime.now(UTC)
    assert cron.is_due(now - timedelta(days=2)).is_due
    state = cron.is_due(now)
    expected = croniter("0 9 * * *", now.astimezone(zone)).get_next(datetime) - now
    assert not state.is_due and state.next == pytest.approx(expected.total_seconds(), abs=5)
    # celery-redbeat can store it (as a plain crontab; the beat app swaps the zone back in).
    stored = json.loads(json.dumps(cron, cls=RedBeatJSONEncoder))
    assert (stored["__type__"], stored["minute"], stored["hour"]) == ("crontab", "0", "9")


def test_cli_validate_and_list(tmp_path: Path) -> None:
    bad = avatarq("schedule", "validate", str(write(tmp_path, BAD)))
    assert bad.returncode == 2
    assert "schedule.yaml:4 announcements[0].cron: invalid cron expression" in bad.stderr
    good_path = write(tmp_path, GOOD)
    assert avatarq("schedule", "validate", str(good_path)).returncode == 0
    listed = avatarq("schedule", "list", str(good_path), "--count", "2", "--json")
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    assert [r["name"] for r in rows] == ["opening", "heartbeat"]
    assert rows[0]["timezone"] == "Europe/Berlin" and len(rows[0]["next"]) == 2
    assert rows[0]["next"][0].endswith(("+01:00", "+02:00"))


def start_beat(name: str, env: dict[str, str], log_dir: Path) -> ManagedProcess:
    argv = [sys.executable, "-m", "celery", "-A", "producers.beat", "beat", "--loglevel", "INFO"]
    proc = ManagedProcess(
        name,
        argv,
        ready=lambda: "beat: Starting..." in proc.tail(100),
        env=env,
        log_dir=log_dir,
        start_timeout=60,
    )
    return proc.start()


@pytest.mark.slow
def test_two_beats_fire_every_slot_once(tmp_path: Path, redis_server: str) -> None:
    url = own_db(redis_server, 1)
    client = redis.Redis.from_url(url)
    env = {"REDIS_URL": url, "AVATARQ_SCHEDULE_FILE": str(write(tmp_path, GOOD))}
    beats = [start_beat(f"beat{i}", env, tmp_path / "logs") for i in (1, 2)]
    try:
        # Wait for the first fire, then count over a fixed window with both beats running.
        deadline = time.monotonic() + 30
        while client.llen(RENDER_QUEUE) == 0:
            assert time.monotonic() < deadline, "\n".join(b.tail() for b in beats)
            time.sleep(0.1)
        start = client.llen(RENDER_QUEUE)
        window_s = 8.0
        time.sleep(window_s)
        ids = queued_job_ids(client)
        fired = len(ids) - start
        # Read before stopping: once the active beat exits, the standby may take the lock.
        logs = [b.tail(200) for b in beats]
    finally:
        for b in beats:
            b.stop()
    # One beat holds redbeat's lock; the other stands by and sends nothing.
    assert sum("beat: Acquired lock" in log for log in logs) == 1, logs
    assert sum(log.count("Sending due task heartbeat") for log in logs) >= len(ids)
    assert len(set(ids)) == len(ids), ids  # no slot fired twice
    assert window_s / 2 - 1 <= fired <= window_s / 2 + 1, ids
    assert all(i.startswith("heartbeat-") for i in ids)
    slots = sorted(datetime.strptime(i.split("-", 1)[1], "%Y%m%dT%H%M%SZ") for i in ids)
    assert all((b - a).total_seconds() in (2, 4) for a, b in zip(slots, slots[1:], strict=False))
