"""A GPU-free stand-in for the Avaluma avatar server, for development, tests and benchmarks.

Speaks Avaluma's HTTP API and, in the LiveKit room, the livekit-agents DataStream audio
protocol (receiving with livekit-agents' own DataStreamAudioReceiver); plays audio out in real
time, publishes a generated video track and records everything it received.
"""

from .cli import main

__all__ = ["main"]
