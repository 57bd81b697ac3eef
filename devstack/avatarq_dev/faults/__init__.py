"""The fault suite: each fault injected into the real local stack, with figures.

The lab (`lab.py`) runs the stack and breaks it, the scenarios (`scenarios.py`) each inject one
fault, and the verdict (`judge.py`) feeds `avatarq faults`' table; `tests/test_faults.py` runs
every scenario on both brokers and asserts on the observations itself."""

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
