"""Which URLs a job may make a worker open (SSRF protection): audio sources and webhooks.

Only public addresses by default; each kind has its own `UrlPolicy` (`AVATARQ_SOURCE_HOSTS`,
`AVATARQ_ALLOW_PRIVATE_SOURCES`, and the same for webhooks). Producers check what they can
without DNS; workers check again at every address and redirect (tasks/safehttp.py)."""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from fnmatch import fnmatch
from functools import partial
from typing import Literal
from urllib.parse import urlsplit

from avatarq.errors import InvalidJob, Reason
from avatarq.settings import Settings

REASON = Reason.SOURCE_NOT_ALLOWED
WEBHOOK_REASON = Reason.WEBHOOK_NOT_ALLOWED

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class UrlPolicy:
    """Where URLs of one kind (`what`) may lead, and the settings that say so."""

    what: str
    hosts: tuple[str, ...]
    allow_private: bool
    hosts_setting: str
    private_setting: str
    reason: str

    def check_host(self, host: str) -> None:
        """Raise InvalidJob if `host` is outside the allowlist (when there is one)."""
        host = host.lower().rstrip(".")
        if self.hosts and not any(fnmatch(host, pattern) for pattern in self.hosts):
            raise InvalidJob(
                f"{self.what} host {host!r} is not in {self.hosts_setting}", reason=self.reason
            )

    def check_address(self, host: str, address: IpAddress) -> None:
        """Raise InvalidJob if `host`'s `address` is private while private ones are refused
        (an IPv4 address inside an IPv6 one counts as itself)."""
        if self.allow_private or all(a.is_global for a in (address, *_embedded(address))):
            return
        raise InvalidJob(
            f"{self.what} host {host!r} is a private address ({address}); set "
            f"{self.private_setting}=true to allow it",
            reason=self.reason,
        )


def _hosts(value: str) -> tuple[str, ...]:
    return tuple(h.strip().lower() for h in value.split(",") if h.strip())


UrlKind = Literal["source", "webhook"]

#: Each kind of URL's pair of settings (its host allowlist, its switch that admits private
#: addresses), and the reason a refused URL of that kind fails with.
_KINDS: dict[UrlKind, tuple[str, str, str]] = {
    "source": ("AVATARQ_SOURCE_HOSTS", "AVATARQ_ALLOW_PRIVATE_SOURCES", REASON),
    "webhook": ("AVATARQ_WEBHOOK_HOSTS", "AVATARQ_ALLOW_PRIVATE_WEBHOOKS", WEBHOOK_REASON),
}


def url_policy(settings: Settings, what: UrlKind) -> UrlPolicy:
    """Where URLs of kind `what` may lead, by that kind's pair of settings."""
    hosts_setting, private_setting, reason = _KINDS[what]
    hosts, allow_private = (
        (settings.source_hosts, settings.allow_private_sources)
        if what == "source"
        else (settings.webhook_hosts, settings.allow_private_webhooks)
    )
    return UrlPolicy(what, _hosts(hosts), allow_private, hosts_setting, private_setting, reason)


source_policy = partial(url_policy, what="source")
webhook_policy = partial(url_policy, what="webhook")


def check_url(url: str, policy: UrlPolicy, *, resolve: bool) -> None:
    """Raise InvalidJob if the http(s) `url` may not be opened under `policy`. Other URLs
    pass (they are not fetched over the network by the worker)."""
    parts = urlsplit(url)
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        return
    host = parts.hostname.lower().rstrip(".")
    policy.check_host(host)
    if policy.allow_private:
        return
    for address in _addresses(host, parts.port, resolve=resolve):
        policy.check_address(host, address)


def check_source_url(url: str, settings: Settings, *, resolve: bool) -> None:
    """Raise InvalidJob if the http(s) source `url` may not be fetched. Other sources pass."""
    check_url(url, source_policy(settings), resolve=resolve)


def safe_url(url: str) -> str:
    """`url` without user:password and query string (where tokens and signatures live)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{host}:{parts.port}" if parts.port is not None else host
    return f"{parts.scheme}://{netloc}{parts.path}"


def parse_address(text: str) -> IpAddress:
    """An address as sockets report it (an IPv6 scope id dropped)."""
    return ipaddress.ip_address(text.split("%")[0])


#: IPv6 prefixes that carry an IPv4 address in their last 32 bits (NAT64, RFC 6052 and 8215).
_NAT64 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))


def _embedded(address: IpAddress) -> list[ipaddress.IPv4Address]:
    """The IPv4 address an IPv6 one leads to (mapped, 6to4, NAT64), which a gateway may reach."""
    if isinstance(address, ipaddress.IPv4Address):
        return []
    if address.ipv4_mapped is not None:
        return [address.ipv4_mapped]
    if address.sixtofour is not None:
        return [address.sixtofour]
    if any(address in net for net in _NAT64):
        return [ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)]
    return []


def _addresses(host: str, port: int | None, *, resolve: bool) -> list[IpAddress]:
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        pass
    if host[:1].isdigit():
        # The forms a resolver also takes for an IPv4 address: 127.1, 2130706433, 0x7f000001.
        try:
            return [ipaddress.IPv4Address(socket.inet_aton(host))]
        except OSError:
            pass
    if host == "localhost" or host.endswith(".localhost"):
        return [ipaddress.ip_address("127.0.0.1")]
    if not resolve:
        return []
    try:
        infos = socket.getaddrinfo(host, port or 443, proto=socket.IPPROTO_TCP)
    except OSError:
        return []  # unresolvable: the fetch itself will fail and say so
    return [parse_address(str(info[4][0])) for info in infos]
