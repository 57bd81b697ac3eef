"""Which URLs a job may make a worker fetch (SSRF protection).

A job's `http(s)://` source makes a worker open a connection wherever the URL points, so
it could reach services that are only meant to be internal. By default only public addresses
are allowed; `AVATARQ_SOURCE_HOSTS` narrows sources to an allowlist of hosts and
`AVATARQ_ALLOW_PRIVATE_SOURCES` admits private, loopback and link-local addresses (local
development). Producers check what they can without DNS; workers check again, resolving the
host.
"""

from __future__ import annotations

import ipaddress
import socket
from fnmatch import fnmatch
from urllib.parse import urlsplit

from avatarq.errors import InvalidJob
from avatarq.settings import Settings

REASON = "source_not_allowed"


def allowed_hosts(settings: Settings) -> list[str]:
    return [h.strip().lower() for h in settings.source_hosts.split(",") if h.strip()]


def check_source_url(url: str, settings: Settings, *, resolve: bool) -> None:
    """Raise InvalidJob if the http(s) `url` may not be fetched. Other sources pass."""
    parts = urlsplit(url)
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        return
    host = parts.hostname.lower()
    hosts = allowed_hosts(settings)
    if hosts and not any(fnmatch(host, pattern) for pattern in hosts):
        raise InvalidJob(f"source host {host!r} is not in AVATARQ_SOURCE_HOSTS", reason=REASON)
    if settings.allow_private_sources:
        return
    for address in _addresses(host, parts.port, resolve=resolve):
        if not address.is_global:
            raise InvalidJob(
                f"source host {host!r} is a private address ({address}); set "
                "AVATARQ_ALLOW_PRIVATE_SOURCES=true to allow it",
                reason=REASON,
            )


def _addresses(
    host: str, port: int | None, *, resolve: bool
) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        pass
    if host == "localhost" or host.endswith(".localhost"):
        return [ipaddress.ip_address("127.0.0.1")]
    if not resolve:
        return []
    try:
        infos = socket.getaddrinfo(host, port or 443, proto=socket.IPPROTO_TCP)
    except OSError:
        return []  # unresolvable: the fetch itself will fail and say so
    return [ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos]
