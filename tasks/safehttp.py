"""An HTTP client that only reaches where a `UrlPolicy` allows, whatever the URL or DNS says.

A check before fetching is not enough (redirects, DNS rebinding), so every address is checked
as its socket is made, redirects are followed here, by hand, each hop checked, and no proxy
from the environment is used, so the checked address is the peer."""

from __future__ import annotations

import socket
from collections.abc import Mapping
from types import TracebackType

import aiohttp
from aiohappyeyeballs import AddrInfoType
from yarl import URL

from avatarq.errors import InvalidJob
from avatarq.sourcepolicy import UrlPolicy, check_url, parse_address, safe_url

MAX_REDIRECTS = 5
REDIRECTS = frozenset({301, 302, 303, 307, 308})


class SafeHttp:
    """`async with SafeHttp(policy) as http: resp = await http.request("GET", url)`."""

    def __init__(
        self,
        policy: UrlPolicy,
        *,
        timeout: aiohttp.ClientTimeout,
        follow_redirects: bool = True,
    ) -> None:
        self.policy = policy
        self.follow_redirects = follow_redirects
        self._timeout = timeout
        self._host = ""
        self._refused: InvalidJob | None = None
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> SafeHttp:
        connector = aiohttp.TCPConnector(socket_factory=self._socket)
        # auto_decompress off: bytes are relayed as the server sent them, with their length.
        self._session = aiohttp.ClientSession(
            connector=connector, timeout=self._timeout, auto_decompress=False, trust_env=False
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._session is not None:
            await self._session.close()

    def _socket(self, addr_info: AddrInfoType) -> socket.socket:
        family, type_, proto, _, sockaddr = addr_info
        try:
            self.policy.check_address(self._host, parse_address(str(sockaddr[0])))
        except InvalidJob as e:
            self._refused = e
            raise OSError(str(e)) from None
        return socket.socket(family=family, type=type_, proto=proto)

    async def request(
        self,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str] | None = None,
        data: bytes | None = None,
    ) -> aiohttp.ClientResponse:
        """The response to `url` after the allowed redirects (the caller releases it).

        Raises InvalidJob (the policy's reason) when a hop or an address is not allowed or
        there are too many redirects; aiohttp's errors for everything else.
        """
        assert self._session is not None, "use `async with SafeHttp(...)`"
        for _hop in range(MAX_REDIRECTS + 1):
            check_url(url, self.policy, resolve=False)  # allowlist; IP literals; localhost
            self._host = URL(url).host or ""
            self._refused = None
            try:
                resp = await self._session.request(
                    method, url, headers=headers, data=data, allow_redirects=False
                )
            except aiohttp.ClientConnectorError:
                if self._refused is not None:
                    raise self._refused from None
                raise
            location = resp.headers.get("Location")
            if not self.follow_redirects or resp.status not in REDIRECTS or not location:
                return resp
            resp.release()
            try:
                url = str(URL(url).join(URL(location)))
            except ValueError as e:  # the server's own Location: no retry makes it readable
                raise InvalidJob(
                    f"{self.policy.what} redirected to an unreadable URL: {e}",
                    reason=self.policy.reason,
                ) from None
            if resp.status == 303 or (resp.status in (301, 302) and method == "POST"):
                method, data = "GET", None  # what browsers (and aiohttp) do
        raise InvalidJob(
            f"{self.policy.what} {safe_url(url)} redirects more than {MAX_REDIRECTS} times",
            reason=self.policy.reason,
        )


def describe_failure(exc: BaseException) -> str:
    """A short sentence for a connection failure, without the URL's secrets."""
    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        return f"cannot resolve host {exc.host}"
    if isinstance(exc, aiohttp.ClientConnectorError):
        what = "Connection refused" if isinstance(exc.os_error, ConnectionRefusedError) else None
        return f"{what or 'cannot connect'} ({exc.host}:{exc.port})"
    if isinstance(exc, TimeoutError):
        return "timed out"
    return str(exc) or type(exc).__name__
