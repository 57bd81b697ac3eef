"""The fleet under contention (devstack/avatarq_dev/faults/fleet.py), on both brokers, default
settings but the quota: 30 one-second jobs over 6 rooms, 2 avatar sessions for the fleet, 3
workers of which 2 are SIGKILLed at random and replaced, avatar starts failing first. None is
lost, wedged or heard twice, each room hears its jobs in order and one at a time, and the
avatar server never sees more sessions than the quota."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from avatarq_dev.faults import FaultLab, fault_lab
from avatarq_dev.faults.fleet import Load, peak_sessions, stress
from tests.netns import needs_netns
from tests.test_faults import detail, is_whole, scenario_checks


@pytest.fixture(scope="module", params=["redis", "rabbitmq"])
def lab(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[FaultLab]:
    with fault_lab(tmp_path_factory.mktemp(f"fleet-{request.param}"), broker=request.param) as lab:
        yield lab


def test_peak_sessions_counts_overlaps_only() -> None:
    sessions = [
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
    scenario_checks(run)
    assert facts["stranded"] == [], detail(run)
    assert {r.get("status") for r in run.records.values()} == {"completed"}, detail(run)
    assert all(n == 0 for n in facts["left_in_rooms"].values()), facts["left_in_rooms"]
    for room in facts["rooms"]:
        enqueued = [j for j in run.ids if lab.rooms[j] == room]
        heard = [s.job_id for s in run.segments if s.room == room and is_whole(run, s)]
        assert heard == enqueued, f"room {room} out of order\n{detail(run)}"
    assert facts["peak_sessions"] <= load.quota, json.dumps(run.sessions, default=str)
    assert len(facts["killed_at"]) == load.kills
