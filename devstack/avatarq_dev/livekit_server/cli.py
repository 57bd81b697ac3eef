"""Command line of the dev LiveKit-protocol server (`python -m avatarq_dev.livekit_server`)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import warnings

from jwt.warnings import InsecureKeyLengthWarning

from .auth import parse_keys
from .config import DEFAULT_EMPTY_TIMEOUT, ServerConfig

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7880


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m avatarq_dev.livekit_server",
        description="Local LiveKit-protocol server for development and tests.",
    )
    parser.add_argument("--host", default=DEFAULT_HOST)
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument(
        "--keys", default="devkey: secret", help='API keys, "key: secret[, key2: secret2]"'
    )
    parser.add_argument(
        "--empty-timeout",
        type=int,
        default=DEFAULT_EMPTY_TIMEOUT,
        help="seconds an empty room is kept open",
    )
    parser.add_argument("--log-level", default="INFO")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        keys = parse_keys(args.keys)
    except ValueError as e:
        build_parser().error(str(e))
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    # aiortc/aioice log every ICE check and SCTP event at INFO; one line per join, leave and
    # publish is all this server should say.
    for noisy in ("aiortc", "aioice", "aiohttp.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # Dev keys like livekit-server's own "devkey: secret" are short on purpose.
    warnings.filterwarnings("ignore", category=InsecureKeyLengthWarning)
    from .app import serve  # after logging is set up

    config = ServerConfig(keys=keys, empty_timeout=args.empty_timeout)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(config, args.host, args.port))
    return 0
