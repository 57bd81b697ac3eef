"""Marks for tests that join LiveKit rooms: they only run inside infra/netns-run, since
libwebrtc ignores loopback interfaces (`make test` runs the whole suite there)."""

from __future__ import annotations

import os

import pytest

needs_netns = pytest.mark.skipif(
    os.environ.get("AVATARQ_IN_NETNS") != "1",
    reason="joins LiveKit rooms: run inside infra/netns-run (libwebrtc ignores loopback)",
)
#: `pytestmark = NETNS` for a module whose every test joins rooms.
NETNS = [pytest.mark.netns, needs_netns]
