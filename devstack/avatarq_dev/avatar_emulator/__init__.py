"""A GPU-free stand-in for the Avaluma avatar server, for development, tests and benchmarks.

Speaks Avaluma's HTTP API and, in the LiveKit room, the livekit-agents DataStream audio
protocol (receiving with livekit-agents' own DataStreamAudioReceiver); plays audio out in real
time, publishes a generated video track and records everything it received.
"""

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """The emulator's command line (cli.py). Imported on use: it needs livekit-agents (the dev
    stack's `emulator` extra), which its other modules (e.g. behaviour) do not."""
    from .cli import main as run

    return run(argv)
