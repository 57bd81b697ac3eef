"""The fleet under contention (devstack/avatarq_dev/faults/fleet.py), on both brokers, default
settings but the quota: 30 one-second jobs over 6 rooms, 2 avatar sessions for the fleet, 3
workers of which 2 are SIGKILLed at random and replaced, avatar starts failing first. None is
lost, wedged or heard twice, each room hears its jobs in order and one at a time, and the
avatar server never sees more sessions than the quota. Then a lane's own faults: SIGTERM of
the worker holding it, and a cancel of a job parked in it; and a fleet with more rooms than
threads, whose rooms still start their avatars once each, and where a job's late message
leaves its failure in Celery's state."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from typing import Any

import pytest

from avatarq_dev.faults import FaultLab, fault_lab
from avatarq_dev.faults.fleet import (
    Load,
    cancel_in_a_lane,
    idle_session_of_a_cut_off_worker,
    late_copy_of_a_failed_job,
    more_rooms_than_threads,
    peak_sessions,
    sigterm_with_a_lane,
    slow_webhook_in_a_lane,
    stress,
)
from tests.netns import needs_netns
from tests.test_faults import detail, played_order, scenario_checks


@pytest.fixture(scope="module", params=["redis", "rabbitmq"])
def lab(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[FaultLab]:
    with fault_lab(tmp_path_factory.mktemp(f"fleet-{request.param}"), broker=request.param) as lab:
        yield lab


def test_peak_sessions_counts_overlaps_only() -> None:
    sessions: list[dict[str, Any]] = [
        {"created_at": 0.0, "stopped_at": 2.0},
        {"created_at": 1.0, "stopped_at": 3.0},
        {"created_at": 2.0, "stopped_at": 4.0},  # starts as the first stops
        {"created_at": 3.5, "stopped_at": None},  # still alive at the end
    ]
    assert peak_sessions(sessions, until=5.0) == 2
    assert peak_sessions(sessions[:2], until=5.0) == 2
    assert peak_sessions([], until=1.0) == 0


@pytest.mark.netns
@needs_netns
def test_the_fleet_under_contention_loses_nothing_and_keeps_the_quota(lab: FaultLab) -> None:
    load = Load()
    run = stress(lab, load)
    facts = run.facts
    assert facts["missing"] == {}, json.dumps(facts["missing"], indent=1)
    # A worker killed in a one-second clip's last quarter second leaves a segment that looks
    # whole; its job plays again (heard twice is bounded by resume, tests/test_faults.py).
    scenario_checks(run, replays_ok=True)
    assert facts["stranded"] == [], detail(run)
    assert {r.get("status") for r in run.records.values()} == {"completed"}, detail(run)
    assert all(n == 0 for n in facts["left_in_rooms"].values()), facts["left_in_rooms"]
    for room in facts["rooms"]:
        enqueued = [j for j in run.ids if lab.rooms[j] == room]
        assert played_order(run, enqueued) == enqueued, f"room {room} out of order\n{detail(run)}"
    assert facts["peak_sessions"] <= load.quota, json.dumps(run.sessions, default=str)
    assert len(facts["killed_at"]) == load.kills


@pytest.mark.netns
@needs_netns
def test_sigterm_hands_a_lane_back_in_order(lab: FaultLab) -> None:
    run = scenario_checks(sigterm_with_a_lane(lab))
    head, *behind = run.ids
    assert [run.records[j].get("status") for j in run.ids] == ["completed"] * 3, detail(run)
    assert run.records[head]["attempt"] == 2, detail(run)  # handed back once
    assert played_order(run, run.ids) == run.ids, detail(run)
    # It resumed where the avatar reported it stopped, less the overlap.
    assert run.records[head]["seconds_heard_twice"] <= 0.3 + 0.5, detail(run)
    # The parked jobs went back at once, not after the stopping worker's heartbeat lapsed.
    assert all(run.records[j]["attempt"] == 1 for j in behind), detail(run)


@pytest.mark.netns
@needs_netns
def test_a_job_cancelled_in_a_lane_never_plays(lab: FaultLab) -> None:
    run = scenario_checks(cancel_in_a_lane(lab))
    head, cancelled, last = run.ids
    assert run.facts["answer"] == "queued"
    assert run.records[cancelled]["status"] == "cancelled", detail(run)
    assert run.records[cancelled]["cancelled_while"] == "queued", detail(run)
    assert [run.records[j]["status"] for j in (head, last)] == ["completed"] * 2, detail(run)
    assert played_order(run, [head, last]) == [head, last], detail(run)


@pytest.mark.netns
@needs_netns
def test_a_room_keeps_its_avatar_when_its_next_jobs_are_behind_other_rooms(lab: FaultLab) -> None:
    run = scenario_checks(more_rooms_than_threads(lab))
    assert {r.get("status") for r in run.records.values()} == {"completed"}, detail(run)
    for room in run.facts["rooms"]:
        jobs = [j for j in run.ids if run.records[j]["room"] == room]
        assert played_order(run, jobs) == jobs, f"room {room} out of order\n{detail(run)}"
        # One cold start per room: its second and third jobs played on its first's avatar.
        cold = [j for j in jobs if not run.records[j].get("warm")]
        assert cold == jobs[:1], f"room {room}: cold starts {cold}\n{detail(run)}"


@pytest.mark.netns
@needs_netns
def test_a_late_copy_of_a_failed_job_leaves_its_failure_in_celery(lab: FaultLab) -> None:
    run = scenario_checks(late_copy_of_a_failed_job(lab))
    statuses = [run.records[j]["status"] for j in run.ids]
    assert statuses == ["completed", "completed", "failed"], detail(run)
    assert run.facts["copy_dropped"], detail(run)  # its message came after it ended
    assert run.facts["celery_state"] == "FAILURE", detail(run)


@pytest.mark.netns
@needs_netns
def test_an_idle_session_of_a_cut_off_worker_ends_before_its_slot_lapses(lab: FaultLab) -> None:
    run = scenario_checks(idle_session_of_a_cut_off_worker(lab))
    statuses = [run.records[j]["status"] for j in run.ids]
    assert statuses == ["completed", "completed"], detail(run)
    assert run.facts["peak_sessions"] == 1, detail(run)


@pytest.mark.netns
@needs_netns
def test_a_slow_webhook_does_not_hold_up_the_rooms_next_job(lab: FaultLab) -> None:
    run = scenario_checks(slow_webhook_in_a_lane(lab))
    assert [run.records[j]["status"] for j in run.ids] == ["completed"] * 3, detail(run)
    ours = sorted((s for s in run.segments if s.job_id in run.ids), key=lambda s: s.start)
    assert [s.job_id for s in ours] == run.ids, detail(run)
    gaps = [b.start - a.end for a, b in itertools.pairwise(ours)]
    # Each job's webhook took 2 s to answer; the room's next job did not wait for it.
    assert max(gaps) < 1.0, f"silences between jobs {gaps}\n{detail(run)}"
    assert run.facts["webhooks"] == run.ids, detail(run)  # all delivered, in the room's order
