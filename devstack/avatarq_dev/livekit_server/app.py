"""The aiohttp application: signaling, validation, RoomService, and a health check."""

from __future__ import annotations

import asyncio
import logging
import signal

from aiohttp import web
from livekit.protocol import models

from .config import ServerConfig
from .room import RoomRegistry
from .signaling import SignalService
from .twirp import RoomService

log = logging.getLogger("avatarq.livekit_server")

REGISTRY_KEY = web.AppKey("registry", RoomRegistry)


async def _health(request: web.Request) -> web.Response:
    # The real server answers "OK" on / ; tests and scripts poll it for readiness.
    return web.Response(text="OK")


async def _close_rooms(app: web.Application) -> None:
    registry = app[REGISTRY_KEY]
    for room in list(registry.rooms.values()):
        registry.delete(room, models.DisconnectReason.SERVER_SHUTDOWN)


def create_app(config: ServerConfig) -> web.Application:
    registry = RoomRegistry(config.empty_timeout, config.departure_timeout)
    app = web.Application()
    app[REGISTRY_KEY] = registry
    app.add_routes([web.get("/", _health)])
    app.add_routes(SignalService(config, registry).routes())
    app.add_routes(RoomService(config, registry).routes())
    app.on_shutdown.append(_close_rooms)
    return app


async def serve(config: ServerConfig, host: str, port: int) -> None:
    """Run until SIGINT/SIGTERM."""
    runner = web.AppRunner(create_app(config), access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    log.info("livekit dev server listening on ws://%s:%d", host, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
