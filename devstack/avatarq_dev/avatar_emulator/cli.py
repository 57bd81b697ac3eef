"""Command line of the avatar emulator: `python -m avatarq_dev.avatar_emulator`."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from aiohttp import web

from tasks.toolkit import quiet_livekit_logs

from .http import Emulator, create_app

LICENSE_KEY_ENV = "AVALUMA_LICENSE_KEY"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m avatarq_dev.avatar_emulator",
        description="GPU-free stand-in for the Avaluma avatar server.",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8089)
    p.add_argument(
        "--license-key",
        default=None,
        help=f"the api-secret clients must send (default: ${LICENSE_KEY_ENV})",
    )
    p.add_argument(
        "--record-dir",
        type=Path,
        default=None,
        help="write {session_id}.wav and {session_id}.json here (default: record nothing)",
    )
    p.add_argument(
        "--publish",
        choices=["runner", "video_only"],
        default="runner",
        help="runner: AvatarRunner's order, video once the audio is subscribed (real avatars); "
        "video_only: video at once, for a LiveKit server that forwards no media (the "
        "embedded one), where no subscription ever completes",
    )
    p.add_argument("--log-level", default="INFO")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    license_key = args.license_key or os.environ.get(LICENSE_KEY_ENV, "")
    if not license_key:
        print(f"a license key is required: --license-key or ${LICENSE_KEY_ENV}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # livekit-agents logs per-RPC and per-stream details at INFO (the rtc SDK's loggers are
    # quieted with the worker's settings below).
    for noisy in ("livekit.agents", "aiohttp.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # A real avatar server runs each session in a process of its own (a livekit-agents job)
    # on machines of its own. Hosting them all in one process beside the workers, the SDK's
    # defaults would hand every room's FFI events to every session and every native log
    # record to Python: CPU taken from the cores the workers are measured on, which no real
    # avatar server takes. So the emulator runs the SDK as a worker does (docs/performance.md).
    quiet_livekit_logs()
    if args.record_dir is not None:
        args.record_dir.mkdir(parents=True, exist_ok=True)
    emulator = Emulator(license_key, args.record_dir)
    emulator.faults.publish = args.publish
    app = create_app(emulator)
    logging.getLogger(__name__).info(
        "avatar emulator listening on http://%s:%d", args.host, args.port
    )
    web.run_app(app, host=args.host, port=args.port, access_log=None, print=None)
    return 0
