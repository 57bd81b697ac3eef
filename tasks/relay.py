"""ffmpeg's only road to an http(s) source: a loopback HTTP relay in front of `SafeHttp`.

ffmpeg follows redirects and resolves hosts by itself, so it opens a local URL with an
unguessable path instead, and this relay fetches the real one with every hop and address
checked. What ffmpeg relies on (ranges, lengths, statuses) passes through:
docs/architecture.md (the audio path)."""

from __future__ import annotations

import asyncio
import secrets
import socket
from types import TracebackType
from typing import Any

import aiohttp
from aiohttp import web

from avatarq.errors import JobError
from avatarq.sourcepolicy import UrlPolicy
from tasks.safehttp import SafeHttp, describe_failure

#: What ffmpeg may use to read a relayed source: plain http to loopback.
RELAY_PROTOCOLS: tuple[str, ...] = ("http", "tcp")
#: Request headers passed upstream: those ffmpeg uses to seek and resume, and its name.
_FORWARDED = ("Range", "If-Range", "User-Agent")
#: Response headers passed back; never Location, Set-Cookie or anything else.
_RETURNED = (
    "Content-Type",
    "Content-Length",
    "Content-Range",
    "Content-Encoding",
    "Accept-Ranges",
    "ETag",
    "Last-Modified",
)
_BLOCK_BYTES = 64 * 1024
# Like ffmpeg's own rw_timeout: a stalled server fails the read; ffmpeg then reconnects.
_UPSTREAM_TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=15)


class SourceRelay:
    """Serves one source URL at `local_url` for the lifetime of the `async with` block.

    After ffmpeg failed, `refusal` holds the policy's InvalidJob if a hop or an address was
    refused, and `failure` the last upstream connection failure: better messages than what
    ffmpeg could say about the relay.
    """

    def __init__(self, url: str, policy: UrlPolicy) -> None:
        self.url = url
        self.policy = policy
        self.local_url = ""
        self.refusal: JobError | None = None
        self.failure: str | None = None
        self._token = secrets.token_urlsafe(16)
        self._http = SafeHttp(policy, timeout=_UPSTREAM_TIMEOUT)
        self._runner: web.AppRunner | None = None
        self._handlers: set[asyncio.Task[Any]] = set()

    async def __aenter__(self) -> SourceRelay:
        app = web.Application()
        app.router.add_route("*", "/{token}", self._handle)
        runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await runner.setup()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        await self._http.__aenter__()
        try:
            await web.SockSite(runner, sock).start()
        except BaseException:
            await self._close(runner)
            raise
        self._runner = runner
        self.local_url = f"http://127.0.0.1:{sock.getsockname()[1]}/{self._token}"
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._runner is not None:
            await self._close(self._runner)
            self._runner = None

    async def _close(self, runner: web.AppRunner) -> None:
        # Closed after ffmpeg is gone, so a handler still waiting for a (stalled) upstream has
        # nobody to serve: cancel it, rather than let aiohttp wait for it up to 60 s.
        for task in self._handlers:
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        await runner.cleanup()
        await self._http.__aexit__(None, None, None)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            return await self._relay(request)
        finally:
            self._handlers.discard(task)

    async def _relay(self, request: web.Request) -> web.StreamResponse:
        if not secrets.compare_digest(request.match_info["token"], self._token):
            return web.Response(status=404)
        if request.method not in ("GET", "HEAD"):
            return web.Response(status=405)
        headers = {h: request.headers[h] for h in _FORWARDED if h in request.headers}
        # As ffmpeg asks itself: byte ranges must count bytes of the file, not of a gzip of it.
        headers["Accept-Encoding"] = "identity"
        try:
            upstream = await self._http.request(request.method, self.url, headers=headers)
        except JobError as e:  # a hop or an address the policy refuses
            self.refusal = e
            return web.Response(status=403)
        except (aiohttp.ClientError, TimeoutError) as e:
            self.failure = describe_failure(e)
            return web.Response(status=502)  # ffmpeg retries 5xx (reconnect_on_http_error)
        async with upstream:
            out = web.StreamResponse(status=upstream.status, reason=upstream.reason)
            for name in _RETURNED:
                if name in upstream.headers:
                    out.headers[name] = upstream.headers[name]
            await out.prepare(request)
            if request.method == "HEAD":
                return out
            try:
                async for block in upstream.content.iter_chunked(_BLOCK_BYTES):
                    await out.write(block)  # waits while ffmpeg's side is full
            except (aiohttp.ClientError, TimeoutError) as e:
                # Upstream dropped mid-body: cut ffmpeg's connection too, so it resumes with a
                # Range request instead of waiting for bytes that will never come.
                self.failure = describe_failure(e)
                if request.transport is not None:
                    request.transport.close()
                return out
            except ConnectionResetError:
                return out  # ffmpeg went away (the job stopped early)
            await out.write_eof()
        return out
