"""Hold a job's room open by its own timeouts, so that no keeper participant is needed.

livekit-server closes a room of agents alone after its empty or departure timeout and never
changes an open room's timeouts, so the worker creates the room with timeouts as long as the
job needs and reads back what the room really has. The server's rules, with their sources:
docs/compatibility.md."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import aiohttp
from livekit import api

from avatarq.errors import LiveKitRejected, RoomError
from avatarq.settings import Settings

#: Asked for on top of the hold, so that a room created now covers the hold even when the
#: server's clock is up to `CLOCK_SKEW_S` behind ours.
TIMEOUT_MARGIN_S = 60
#: Tolerated difference between this worker's clock and the server's: the server counts a
#: room's age from its own clock, we read the creation time against ours.
CLOCK_SKEW_S = 30.0
#: One short request; a server that takes longer is better treated as down.
REQUEST_TIMEOUT_S = 10.0
#: The protocol's timeouts are uint32 seconds.
MAX_TIMEOUT_S = 2**32 - 1


@dataclass(frozen=True)
class RoomHold:
    """How long a room stays open with only agents in it, as CreateRoom reported it."""

    #: Epoch seconds (this worker's clock, less the tolerated skew) until which the server
    #: keeps the room open with only agents in it, whoever joins and leaves meanwhile.
    open_until: float
    empty_timeout_s: int
    departure_timeout_s: int

    def covers(self, hold_s: float, *, now: float | None = None) -> bool:
        """Whether the room stays open for `hold_s` more seconds from `now`: a job on a link
        asks this before it plays without a keeper (tasks/link/link.py, `AvatarLink.cover`)."""
        return self.open_until >= (time.time() if now is None else now) + hold_s


def room_timeout_for(hold_s: float) -> int:
    """The empty and departure timeout (s) to ask for a room that must stay open `hold_s`."""
    return min(MAX_TIMEOUT_S, math.ceil(max(0.0, hold_s)) + TIMEOUT_MARGIN_S)


def hold_of(room: api.Room) -> RoomHold:
    """What a CreateRoom answer means: until when the room stays open with agents alone.

    Both timeouts count: empty_timeout runs from the room's creation while no non-agent ever
    joined, departure_timeout from the last leave once one did (the last leave is never
    before the creation). A timeout of 0 (a server that does not report it) or a missing
    creation time holds the room for no time at all: a keeper joins."""
    created_s = room.creation_time_ms / 1000 if room.creation_time_ms else room.creation_time
    shortest = min(room.empty_timeout, room.departure_timeout)
    open_until = created_s + shortest - CLOCK_SKEW_S if created_s and shortest else 0.0
    return RoomHold(
        open_until=open_until,
        empty_timeout_s=room.empty_timeout,
        departure_timeout_s=room.departure_timeout,
    )


async def hold_room_open(settings: Settings, room: str, hold_s: float) -> RoomHold:
    """Create `room` with empty and departure timeouts that keep it open with only agents in
    it for `hold_s` seconds from now, and read back how long it really stays open (a room
    that existed already keeps its own timeouts).

    `hold_s`: the longest the worker may stay in the room (the longest job's time budget plus
    the warm idle window). Raises LiveKitRejected for refused credentials, RoomError for
    anything a retry may mend."""
    timeout = room_timeout_for(hold_s)
    request = api.CreateRoomRequest(name=room, empty_timeout=timeout, departure_timeout=timeout)
    lkapi = api.LiveKitAPI(
        settings.livekit_url,
        settings.livekit_api_key,
        settings.livekit_api_secret.get_secret_value(),
        timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S),
    )
    try:
        answer = await lkapi.room.create_room(request)
    except api.TwirpError as e:
        if e.status == 401 or e.code == api.TwirpErrorCode.UNAUTHENTICATED:
            raise LiveKitRejected(
                f"the LiveKit server at {settings.livekit_url} refused to create room "
                f"{room!r} ({e.message or e.code}): check LIVEKIT_API_KEY / LIVEKIT_API_SECRET"
            ) from None
        raise RoomError(
            f"could not create the LiveKit room {room!r}: {e.message or e.code} ({e.status})"
        ) from None
    except (TimeoutError, aiohttp.ClientError) as e:
        raise RoomError(
            f"could not create the LiveKit room {room!r} at {settings.livekit_url}: "
            f"{str(e) or type(e).__name__}"
        ) from None
    finally:
        await lkapi.aclose()
    return hold_of(answer)
