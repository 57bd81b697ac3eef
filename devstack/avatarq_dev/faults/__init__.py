"""The fault suite: each fault injected into the real local stack, with figures.

Three parts: the lab (`lab.py`: the stack, the tools to break it, what it observed of a
scenario), the scenarios (`scenarios.py`: enqueue, inject one fault, wait until every job has
ended) and the verdict (`judge.py`: lost, played twice, overlaps, recovery time and each
scenario's own expectations). `tests/test_faults.py` runs each scenario on both brokers (Redis,
RabbitMQ) and asserts on the observations itself; `avatarq faults` prints the judge's table.
"""

from avatarq_dev.faults.judge import FaultReport, judge, leaked_secrets
from avatarq_dev.faults.lab import FaultLab, Run, Segment, fault_lab
from avatarq_dev.faults.scenarios import SCENARIOS

__all__ = [
    "SCENARIOS",
    "FaultLab",
    "FaultReport",
    "Run",
    "Segment",
    "fault_lab",
    "judge",
    "leaked_secrets",
]
