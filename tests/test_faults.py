"""The fault suite (devstack/avatarq_dev/faults.py) against the real stack, with default settings, on
both supported brokers (Redis, and RabbitMQ with Redis for results and the ledger): every
job ends once, none is lost, none is played twice, no room hears two jobs at once, and no
secret leaks."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from avatarq_dev.faults import SCENARIOS, FaultLab, fault_lab, leaked_secrets
from tests.netns import NETNS

pytestmark = NETNS


@pytest.fixture(scope="module", params=["redis", "rabbitmq"])
def lab(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[FaultLab]:
    with fault_lab(tmp_path_factory.mktemp(f"faults-{request.param}"), broker=request.param) as lab:
        yield lab


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_fault(lab: FaultLab, name: str) -> None:
    report = SCENARIOS[name](lab)
    detail = json.dumps(report.as_dict(), indent=1, default=str)
    assert report.lost == 0, detail
    assert report.played_twice == 0, detail
    assert report.overlaps == 0, detail
    assert all(report.checks.values()), detail


def test_no_secret_in_logs_results_or_events(lab: FaultLab) -> None:
    # Runs after the scenarios (module order): every record, event and log they left.
    assert lab.stack.api_secret.startswith("lk-secret-")
    assert leaked_secrets(lab) == []
