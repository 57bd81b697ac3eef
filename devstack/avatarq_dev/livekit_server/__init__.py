"""A local stand-in for livekit-server, for development and tests without the official one.

It speaks enough of the LiveKit protocol for the unmodified `livekit` SDK and `livekit-api`
(tokens, signalling, data channels, the RoomService API) but forwards no media. What it does
and does not do: docs/development.md (the embedded LiveKit server)."""

from .cli import main

__all__ = ["main"]
