"""Which interpreter runs the avatar emulator (devstack/avatarq_dev/stack.py): this one when
it has livekit-agents, else the one $AVATARQ_DEV_EMULATOR_PYTHON names, so that the worker's
environment can run a livekit SDK that livekit-agents does not accept (docs/compatibility.md)."""

from __future__ import annotations

import importlib.util
import sys

import pytest

from avatarq_dev import stack
from avatarq_dev.processes import ServiceError


def test_the_named_interpreter_runs_the_emulator(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(stack.EMULATOR_PYTHON_ENV, sys.executable)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert stack.emulator_python() == sys.executable


def test_a_named_interpreter_that_is_not_there_is_an_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(stack.EMULATOR_PYTHON_ENV, "/nonexistent/bin/python")
    with pytest.raises(ServiceError, match="not an executable"):
        stack.emulator_python()


def test_without_livekit_agents_or_a_named_interpreter_the_error_says_what_to_do(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(stack.EMULATOR_PYTHON_ENV, raising=False)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ServiceError, match=r"devstack\[emulator\].*AVATARQ_DEV_EMULATOR_PYTHON"):
        stack.emulator_python()


def test_this_interpreter_runs_it_when_it_has_livekit_agents(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(stack.EMULATOR_PYTHON_ENV, raising=False)
    if importlib.util.find_spec("livekit.agents") is None:
        pytest.skip("livekit-agents is not installed here (.venv-lk12)")
    assert stack.emulator_python() == sys.executable
