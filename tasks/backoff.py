"""Exponential backoff with full jitter, so retrying workers don't move in lockstep."""

from __future__ import annotations

import random


def backoff_delay(attempt: int, base: float = 0.5, cap: float = 8.0) -> float:
    """Delay before retry number `attempt + 1` (attempt counts from 0)."""
    return random.uniform(0, min(cap, base * 2**attempt))
