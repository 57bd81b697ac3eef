"""How an emulated avatar server behaves: a real one's ways by default, and the known
misbehaviours of real ones on request (`POST /_emulator/faults`)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class Faults(BaseModel):
    """How the sessions started from now on behave. The defaults are a real avatar server's
    (livekit-agents' AvatarRunner: audio track first, video only once that audio is
    subscribed; receiver bound to the token's sender); the rest reproduces what real servers
    are known to do."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, strict=True)

    # -- the HTTP API ---------------------------------------------------------------------
    fail_next_starts: int = Field(0, ge=0)  # answer the next N valid starts with `fail_status`
    fail_status: int = Field(500, ge=400, le=599)
    retry_after_s: float | None = Field(None, ge=0)  # `Retry-After` on those failures
    start_delay_s: float = Field(0.0, ge=0)  # answer this late (the session starts at once)
    start_body: Literal["json", "text"] = "json"  # "text": a 200 whose body is not JSON
    stop_endpoint: bool = True  # false: stop-avatar answers 404, as newer servers may
    max_sessions: int | None = Field(None, ge=1)  # over it, starts get 429 like Avaluma's
    # -- the session in the room ----------------------------------------------------------
    join: bool = True  # false: accept starts but never join the room
    leave_after_s: float | None = Field(None, ge=0)  # leave the room this long after joining
    publish: Literal["runner", "video_only"] = "runner"
    receiver_delay_s: float = Field(0.0, ge=0)  # register the receiver this long after video
    bind: Literal["token", "first_agent"] = "token"  # whom the receiver listens to
    sample_rates: list[int] | None = None  # e.g. [16000]: other rates are not played
    report_playback: bool = True  # false: never send lk.playback_finished
    report_scale: float = Field(1.0, ge=0, le=1)  # report this share of what was played
    duplicate_reports: bool = False  # send every lk.playback_finished twice

    def update(self, changes: dict[str, Any]) -> None:
        """Apply a partial update; validates everything before changing anything."""
        merged = Faults.model_validate({**self.model_dump(), **changes})
        for name in Faults.model_fields:
            object.__setattr__(self, name, getattr(merged, name))
