"""Server settings, with the defaults of `livekit-server --dev`."""

from __future__ import annotations

from dataclasses import dataclass, field

from .room import new_id

DEFAULT_KEYS = {"devkey": "secret"}
DEFAULT_EMPTY_TIMEOUT = 300
DEFAULT_DEPARTURE_TIMEOUT = 20
SERVER_VERSION = "1.9.0-avatarq"
# Signal protocol version we speak (JoinResponse.server_info.protocol).
SERVER_PROTOCOL = 16
NODE_PREFIX = "ND_"


@dataclass(frozen=True)
class ServerConfig:
    keys: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_KEYS))
    empty_timeout: int = DEFAULT_EMPTY_TIMEOUT
    departure_timeout: int = DEFAULT_DEPARTURE_TIMEOUT
    # The SDK pings every ping_interval and gives up after ping_timeout without traffic;
    # zero makes it panic, so these are always positive (real server defaults).
    ping_interval: int = 5
    ping_timeout: int = 15
    node_id: str = field(default_factory=lambda: new_id(NODE_PREFIX))
