"""The fault suite (devstack/avatarq_dev/faults/) against the real stack, with default settings,
on both supported brokers (Redis, and RabbitMQ with Redis for results and the ledger): every
job ends once, none is lost, none is played twice, no room hears two jobs at once, and no
secret leaks.

The assertions are this file's own, on what the lab observed (records, events, the avatar's
recordings, worker logs, Redis); each test then checks that `avatarq faults`' judge
(avatarq_dev/faults/judge.py) agrees, so its table says the same."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from avatarq.ledger.keys import job_events_key
from avatarq_dev.faults import SCENARIOS, FaultLab, Run, Segment, fault_lab, judge
from avatarq_dev.faults.cutoff import (
    PATIENCE_OUT_S,
    redis_goes_silent_under_the_only_worker,
    worker_cut_off_from_redis_past_its_patience,
)
from avatarq_dev.faults.judge import HEARD_TWICE_LIMIT_S, listened
from tests.netns import NETNS

pytestmark = NETNS

#: A segment is a job's whole audio when it lacks at most this much of it, uninterrupted.
WHOLE_TOLERANCE_S = 0.25
#: Recovery from a killed worker, kill to completion (issue 10's goal).
RECOVERY_S = 60.0


@pytest.fixture(scope="module", params=["redis", "rabbitmq"])
def lab(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[FaultLab]:
    with fault_lab(tmp_path_factory.mktemp(f"faults-{request.param}"), broker=request.param) as lab:
        yield lab


def detail(run: Run) -> str:
    return json.dumps(
        {"records": run.records, "segments": run.segments, "notes": run.notes},
        indent=1,
        default=str,
    )


def is_whole(run: Run, s: Segment) -> bool:
    return not s.interrupted and s.received_s >= run.durations[s.job_id] - WHOLE_TOLERANCE_S


def whole_plays(run: Run, job_id: str) -> int:
    return len([s for s in run.segments if s.job_id == job_id and is_whole(run, s)])


def room_plays(run: Run, room: str, *, whole: bool = False) -> list[str]:
    """The jobs the room's avatar played (uninterrupted; `whole`: in full), in order."""
    return [
        s.job_id
        for s in run.segments
        if s.room == room and not s.interrupted and (is_whole(run, s) or not whole)
    ]


def scenario(lab: FaultLab, name: str) -> Run:
    """Run the scenario; every job ended, none played in full twice, no room overlapped."""
    return scenario_checks(SCENARIOS[name](lab))


def scenario_checks(run: Run, *, replays_ok: bool = False) -> Run:
    """Every job of the run ended, none played in full twice (unless `replays_ok`), no room
    overlapped."""
    assert sorted(run.records) == sorted(run.ids), f"lost jobs\n{detail(run)}"
    for job_id in run.ids:
        if not replays_ok:
            assert whole_plays(run, job_id) <= 1, f"{job_id} played twice\n{detail(run)}"
    ours = [s for s in run.segments if s.job_id in run.ids]
    for room in {s.room for s in ours}:
        in_room = sorted((s for s in ours if s.room == room), key=lambda s: s.start)
        for a, b in zip(in_room, in_room[1:], strict=False):
            assert b.start >= a.end - 0.05, f"{a.job_id} / {b.job_id} overlap\n{detail(run)}"
    return run


def heard_once_in_full(name: str, run: Run) -> None:
    """From the avatar's recordings matched with the source: nothing of the run's jobs was
    never heard, and what was heard twice stays within the overlap plus half a second."""
    heard = {j: listened(run, j) for j in run.ids}
    figures = f"{name}: (never heard, heard twice) {heard}\n{detail(run)}"
    assert all(h is not None for h in heard.values()), figures
    assert sum(h[0] for h in heard.values() if h) == 0, figures
    assert sum(h[1] for h in heard.values() if h) <= HEARD_TWICE_LIMIT_S, figures


def played_order(run: Run, ids: list[str]) -> list[str]:
    """`ids` in the order their final attempts started streaming (their records' first byte):
    a resumed job's last segment is not whole, so the records say the order."""
    return sorted(ids, key=lambda j: run.records[j]["timestamps"]["first_byte"])


def judge_agrees(name: str, run: Run) -> None:
    report = judge(name, run)
    assert report.ok, json.dumps(report.as_dict(), indent=1, default=str)


def ended_on(run: Run, job_id: str) -> tuple[str | None, int | None]:
    rec = run.records.get(job_id, {})
    return rec.get("status"), rec.get("attempt")


def failed_for(run: Run, job_id: str) -> tuple[str | None, int | None]:
    rec = run.records.get(job_id, {})
    return rec.get("reason"), rec.get("attempt")


def recovered_in(run: Run, job_id: str) -> float:
    ended = run.ended_at(job_id)
    assert ended is not None, detail(run)
    return float(ended - run.facts["killed_at"])


def test_sigkill_mid_stream(lab: FaultLab) -> None:
    run = scenario(lab, "sigkill_mid_stream")
    job = run.ids[0]
    assert ended_on(run, job) == ("completed", 2), detail(run)
    assert recovered_in(run, job) < RECOVERY_S
    heard_once_in_full("sigkill_mid_stream", run)
    assert played_order(run, run.ids) == run.ids, detail(run)
    judge_agrees("sigkill_mid_stream", run)


def test_slow_origin_goes_dark(lab: FaultLab) -> None:
    run = scenario(lab, "slow_origin_goes_dark")
    assert run.facts["stalls"] >= 1, detail(run)  # ended cleanly, not cut by the avatar
    assert ended_on(run, run.ids[0])[0] == "completed", detail(run)
    heard_once_in_full("slow_origin_goes_dark", run)
    judge_agrees("slow_origin_goes_dark", run)


def test_sigkill_holding_waiting_jobs(lab: FaultLab) -> None:
    run = scenario(lab, "sigkill_holding_waiting_jobs")
    assert run.facts["statuses_before_kill"] == ["queued", "queued"]
    assert all(ended_on(run, j)[0] == "completed" for j in run.ids), detail(run)
    assert max(recovered_in(run, j) for j in run.ids[1:]) < RECOVERY_S
    assert room_plays(run, run.facts["room"]) == run.ids, detail(run)
    judge_agrees("sigkill_holding_waiting_jobs", run)


def test_sigkill_during_avatar_start(lab: FaultLab) -> None:
    run = scenario(lab, "sigkill_during_avatar_start")
    (job,) = run.ids
    assert ended_on(run, job)[0] == "completed", detail(run)
    assert recovered_in(run, job) < RECOVERY_S
    orphans = [s for s in run.sessions if not s.get("segments")]
    assert any(s.get("stop_reason") == "stop_request" for s in orphans), run.sessions
    judge_agrees("sigkill_during_avatar_start", run)


def test_sigterm_mid_stream(lab: FaultLab) -> None:
    run = scenario(lab, "sigterm_mid_stream")
    (job,) = run.ids
    assert ended_on(run, job) == ("completed", 2), detail(run)
    assert [e["attempt"] for e in run.events[job] if e["event"] == "job.started"] == [1, 2]
    assert run.facts["exited"]
    heard_once_in_full("sigterm_mid_stream", run)
    judge_agrees("sigterm_mid_stream", run)


def test_sigterm_within_grace(lab: FaultLab) -> None:
    run = scenario(lab, "sigterm_within_grace")
    assert ended_on(run, run.ids[0]) == ("completed", 1), detail(run)
    assert run.facts["exited"]
    judge_agrees("sigterm_within_grace", run)


@pytest.mark.parametrize("name", ["redis_restart", "redis_crash"])
def test_redis_fault(lab: FaultLab, name: str) -> None:
    run = scenario(lab, name)
    assert [ended_on(run, j)[0] for j in run.ids] == ["completed"] * 4, detail(run)
    assert run.facts["worker_alive"] and not run.facts["worker_crashed"]
    judge_agrees(name, run)


def test_livekit_restart(lab: FaultLab) -> None:
    run = scenario(lab, "livekit_restart")
    assert ended_on(run, run.ids[0])[0] == "completed", detail(run)
    # What the avatar played once the server was gone reached no one: its record says where.
    room = run.records[run.ids[0]]["room"]
    cut = [
        seg["heard_until"]
        for session in lab.sessions()
        if session.get("room") == room
        for seg in session.get("segments", [])
        if seg.get("heard_until") is not None
    ]
    assert len(cut) == 1 and cut[0] > 0, (cut, detail(run))
    heard_once_in_full("livekit_restart", run)
    judge_agrees("livekit_restart", run)


def test_avatar_500_then_200(lab: FaultLab) -> None:
    run = scenario(lab, "avatar_500_then_200")
    assert ended_on(run, run.ids[0]) == ("completed", 1), detail(run)
    judge_agrees("avatar_500_then_200", run)


def test_avatar_never_joins(lab: FaultLab) -> None:
    run = scenario(lab, "avatar_never_joins")
    (job,) = run.ids
    assert failed_for(run, job) == ("avatar_timeout", 3), detail(run)
    assert [e["event"] for e in run.events[job]].count("job.retrying") == 2
    assert run.facts["dead_lettered"]
    judge_agrees("avatar_never_joins", run)


def test_avatar_leaves_mid_stream(lab: FaultLab) -> None:
    run = scenario(lab, "avatar_leaves_mid_stream")
    first = run.facts["first_record"]
    assert (first.get("reason"), first.get("attempt")) == ("avatar_left", 3), first
    assert run.facts["dead_lettered"]
    assert ended_on(run, run.ids[0])[0] == "completed", detail(run)  # replayed
    judge_agrees("avatar_leaves_mid_stream", run)


def test_s3_object_missing(lab: FaultLab) -> None:
    run = scenario(lab, "s3_object_missing")
    missing, present = run.ids
    assert failed_for(run, missing) == ("source_not_found", 1), detail(run)
    assert "missing.wav" in run.records[missing]["error"]
    assert ended_on(run, present)[0] == "completed", detail(run)
    judge_agrees("s3_object_missing", run)


def test_corrupt_audio(lab: FaultLab) -> None:
    run = scenario(lab, "corrupt_audio")
    assert failed_for(run, run.ids[0]) == ("invalid_audio", 1), detail(run)
    assert not run.segments
    judge_agrees("corrupt_audio", run)


def test_same_room_20(lab: FaultLab) -> None:
    run = scenario(lab, "same_room_20")
    assert all(ended_on(run, j)[0] == "completed" for j in run.ids), detail(run)
    assert room_plays(run, run.facts["room"]) == run.ids, detail(run)
    judge_agrees("same_room_20", run)


def test_same_job_id_5x(lab: FaultLab) -> None:
    run = scenario(lab, "same_job_id_5x")
    (job,) = run.ids
    assert len([s for s in run.segments if s.job_id == job]) == 1, detail(run)
    assert [e["event"] for e in run.events[job]].count("job.started") == 1
    judge_agrees("same_job_id_5x", run)


def test_cancellation(lab: FaultLab) -> None:
    run = scenario(lab, "cancellation")
    playing, queued = run.ids
    p, q = run.records[playing], run.records[queued]
    assert run.facts["cancel_answers"] == ("queued", "playing")
    assert not [s for s in run.segments if s.job_id == queued]
    assert run.recover_s is not None and run.recover_s < 0.5, detail(run)  # asked to stopped
    assert (p.get("playback_position") or 0) > 0.5, p
    assert (p["status"], p.get("cancelled_while")) == ("cancelled", "playing"), p
    assert (q["status"], q.get("cancelled_while")) == ("cancelled", "queued"), q
    judge_agrees("cancellation", run)


def test_warm_session_elsewhere(lab: FaultLab) -> None:
    run = scenario(lab, "warm_session_elsewhere")
    first, _busy, second = run.ids
    assert all(ended_on(run, j)[0] == "completed" for j in run.ids), detail(run)
    assert run.records[second].get("warm") is False
    (held,) = [
        s for s in run.sessions if s["session_id"] == run.records[first]["avatar_session_id"]
    ]
    assert held["stop_reason"] == "stop_request", held  # let go, not knocked out
    judge_agrees("warm_session_elsewhere", run)


def test_raw_payload_without_job_id(lab: FaultLab) -> None:
    run = scenario(lab, "raw_payload_without_job_id")
    assert ended_on(run, run.ids[1])[0] == "completed", detail(run)
    assert run.facts["room_order_left"] == []
    judge_agrees("raw_payload_without_job_id", run)


def test_garbage_with_another_jobs_id(lab: FaultLab) -> None:
    run = scenario(lab, "garbage_with_another_jobs_id")
    assert [ended_on(run, j)[0] for j in run.ids] == ["completed", "completed"], detail(run)
    judge_agrees("garbage_with_another_jobs_id", run)


def test_worker_cut_off_from_redis(lab: FaultLab) -> None:
    """Split brain: the cut-off worker holds its audio, the job plays on from its last record
    on a live worker; reconnected, the old attempt writes no event and publishes no retry."""
    run = scenario(lab, "worker_cut_off_from_redis")
    (job,) = run.ids
    assert ended_on(run, job) == ("completed", 2), detail(run)
    after = [e for e in run.events[job] if e["ts"] > run.facts["taken_over_at"]]
    assert all(e.get("attempt") in (None, 2) for e in after), json.dumps(after, indent=1)
    assert not any(e["event"] == "job.retrying" for e in after), json.dumps(after, indent=1)
    assert not run.facts["victim_retried"]
    # Fenced by its lease, the cut-off worker held its audio 0.5 s past its last record,
    # which is where the job resumed.
    heard_once_in_full("worker_cut_off_from_redis", run)
    judge_agrees("worker_cut_off_from_redis", run)


def test_a_worker_cut_off_from_redis_past_its_patience_loses_no_job(lab: FaultLab) -> None:
    """Its job goes back to the queue (not counted as an attempt) and plays once Redis is
    back. The patience is the product's own (about a minute): the test takes as long."""
    if lab.broker != "rabbitmq":
        pytest.skip("on the Redis broker the cut-off worker receives no job to lose")
    run = scenario_checks(worker_cut_off_from_redis_past_its_patience(lab))
    (job,) = run.ids
    assert ended_on(run, job) == ("completed", 1), detail(run)
    assert run.facts["gave_up_after_s"] < PATIENCE_OUT_S, detail(run)


#: From Redis going silent under an idle worker to its next job's first byte. Measured: 5.1 s
#: on RabbitMQ (one command timeout); 10.7 s on the Redis broker, whose consumer waits for
#: kombu's check of its BRPOP (up to 1 + 2 x 5 s, avatarq/celeryconfig.py; 50.8 s with
#: kombu's default 25 s).
NEXT_JOB_AFTER_SILENCE_S = {"rabbitmq": 20.0, "redis": 30.0}


def test_a_worker_whose_redis_goes_silent_plays_on(lab: FaultLab) -> None:
    """Connections nothing answers and nothing closes (Redis failed over to another host):
    the worker's Redis timeouts end them, and its next commands reach Redis on new ones. The
    playing job is heard once, in full; the next job starts within seconds on RabbitMQ, within
    a minute on the Redis broker, where TCP's retries would take 15 minutes."""
    run = scenario_checks(redis_goes_silent_under_the_only_worker(lab))
    playing, following = run.ids
    assert ended_on(run, playing) == ("completed", 1), detail(run)
    assert ended_on(run, following) == ("completed", 1), detail(run)
    heard_once_in_full("redis_goes_silent_under_the_only_worker", run)
    first_byte = run.records[following]["timestamps"]["first_byte"]
    limit = NEXT_JOB_AFTER_SILENCE_S[lab.broker]
    assert first_byte - run.facts["idle_silent_at"] < limit, detail(run)


def test_avatar_server_dies(lab: FaultLab) -> None:
    run = scenario(lab, "avatar_server_dies")
    (job,) = run.ids
    assert run.records[job]["status"] == "completed", detail(run)
    assert run.records[job]["attempt"] >= 2, detail(run)
    heard_once_in_full("avatar_server_dies", run)
    judge_agrees("avatar_server_dies", run)


def test_every_scenario_has_a_test() -> None:
    tested = {n.removeprefix("test_") for n in globals() if n.startswith("test_")}
    assert set(SCENARIOS) - tested <= {"redis_restart", "redis_crash"}


def test_no_secret_in_logs_results_or_events(lab: FaultLab) -> None:
    # Runs after the scenarios (module order): every record, event and log they left.
    secrets = [lab.stack.api_secret, lab.stack.license_key]
    assert secrets[0].startswith("lk-secret-") and secrets[1].startswith("avaluma-license-")
    exposed = lab.exposed()
    # Something to search: the scenarios' worker logs and what they left in Redis.
    assert any(place.startswith("worker-") for place in exposed)
    assert any(place.startswith(job_events_key("")) for place in exposed)
    assert [place for place, text in exposed.items() if any(s in text for s in secrets)] == []
