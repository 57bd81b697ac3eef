"""Security headers on every response of the API and its console.

The console keeps an API key in its tab, so its origin runs only its own built scripts: no
inline script, no third-party script, never inside another site's frame. The one origin it
talks to besides the API is LiveKit's (the room view), named in `connect-src`.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

#: The browser schemes of one LiveKit URL: the signal WebSocket and the HTTP validate call.
_PAIRED_SCHEME = {"ws": "http", "wss": "https", "http": "ws", "https": "wss"}


def livekit_origins(url: str) -> list[str]:
    """The origins the room view connects to for the LiveKit server at `url`."""
    parts = urlsplit(url)
    other = _PAIRED_SCHEME.get(parts.scheme)
    if not parts.netloc or other is None:
        return []
    return [f"{parts.scheme}://{parts.netloc}", f"{other}://{parts.netloc}"]


def content_security_policy(connect: list[str]) -> str:
    directives = {
        "default-src": "'self'",
        "script-src": "'self'",
        "style-src": "'self'",
        "img-src": "'self' data:",
        "media-src": "'self' blob:",
        "connect-src": " ".join(["'self'", *connect]),
        "object-src": "'none'",
        "base-uri": "'none'",
        "form-action": "'self'",
        "frame-ancestors": "'none'",
    }
    return "; ".join(f"{name} {value}" for name, value in directives.items())


class SecurityHeaders:
    """Add the headers to every HTTP response (errors, redirects and static files too)."""

    def __init__(self, app: ASGIApp, livekit_url: str) -> None:
        self.app = app
        self.headers = {
            "Content-Security-Policy": content_security_policy(livekit_origins(livekit_url)),
            "X-Frame-Options": "DENY",
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer",
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in self.headers.items():
                    headers.setdefault(name, value)
            await send(message)

        await self.app(scope, receive, with_headers)
