"""Each event's `data` has one type (avatarq/events.py), written and read back as it."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from avatarq.events import (
    AvatarReady,
    Event,
    JobStarted,
    Progress,
    Retrying,
    WaitingForAvatar,
    parse_event,
)
from avatarq.results import Cancelled


@pytest.mark.parametrize(
    "payload",
    [
        JobStarted(room="r", avatar_id="a", attempt=2),
        WaitingForAvatar(server="default", place=1, sessions=3, quota=3),
        AvatarReady(session_id=None, warm=True),
        Progress(seconds_streamed=1.5, total_seconds=None),
        Retrying(reason="room_error", attempt=1, retry_in=2.0, error="lost the room"),
    ],
)
def test_every_payload_reads_back_as_its_type(payload: Any) -> None:
    assert parse_event(payload.event.value, payload.data()) == payload


def test_a_retry_without_an_error_leaves_the_field_out() -> None:
    data = Retrying(reason="handed_back", attempt=1, retry_in=0).data()
    assert data == {"reason": "handed_back", "attempt": 1, "retry_in": 0.0}


def test_terminal_events_carry_the_result() -> None:
    result = Cancelled(
        job_id="j", attempt=0, cancelled_while="queued", seconds_streamed=0, playback_position=None
    )
    assert parse_event(Event.CANCELLED.value, result.as_record()) == result


def test_a_payload_of_the_wrong_shape_or_an_unknown_event_is_refused() -> None:
    with pytest.raises(ValidationError):
        parse_event(Event.PROGRESS.value, {"seconds_streamed": "soon"})
    with pytest.raises(ValidationError):
        parse_event(Event.STARTED.value, {"room": "r", "avatar_id": "a", "attempt": 1, "x": 1})
    with pytest.raises(ValueError, match="unknown event"):
        parse_event("job.exploded", {})
