"""Start and stop an avatar session on an Avaluma-compatible avatar server.

We speak the plugin's small HTTP protocol ourselves (it is not on PyPI and is tied to an
AgentSession); `AvatarClient` is the seam for another client. Start is not idempotent, so a
POST is repeated only when the server surely started nothing (docs/protocol.md)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any

import aiohttp

from avatarq.errors import AvatarOverLimit, AvatarRejected, AvatarUnavailable
from tasks.backoff import backoff_delay
from tasks.link.types import AvatarSession

log = logging.getLogger("avatarq.avatar")

START_PATH = "/v1/livekit/start-avatar"
STOP_PATH = "/v1/livekit/stop-avatar"
#: Header the avatar server reads the license key from.
LICENSE_HEADER = "api-secret"
CONNECT_TIMEOUT_S = 10.0
#: A cold GPU start may hold the answer for a long time; the session is starting meanwhile.
START_ANSWER_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 5.0
#: Answers that mean "nothing was started, try again later" (Avaluma: 409 avatar already
#: active, 503 no capacity), besides every 5xx. A 429 (over the license's session limit) is
#: raised at once as AvatarOverLimit: the fleet's session quota (tasks/link/quota.py) handles it.
TRANSIENT_STATUSES = frozenset({408, 409, 425})
OVER_LIMIT = 429
#: Longest `Retry-After` honoured; longer waits become a job retry instead.
RETRY_AFTER_CAP_S = 30.0


class HttpAvatarClient:
    """The Avaluma avatar server's HTTP API: POST start-avatar / stop-avatar."""

    def __init__(
        self,
        name: str,
        base_url: str,
        license_key: str,
        *,
        attempts: int = 4,
        session: aiohttp.ClientSession | None = None,
    ) -> None:
        self.name = name
        self.base_url = base_url.rstrip("/")
        self._license_key = license_key
        self.attempts = max(1, attempts)
        self._session = session

    def __repr__(self) -> str:
        return f"HttpAvatarClient({self.name!r}, {self.base_url!r})"

    @property
    def label(self) -> str:
        return f"avatar server {self.name!r} ({self.base_url})"

    def _headers(self) -> dict[str, str]:
        return {LICENSE_HEADER: self._license_key}

    async def start(
        self, *, livekit_url: str, livekit_token: str, avatar_id: str, avatar_identity: str
    ) -> AvatarSession:
        body = {
            "livekit_url": livekit_url,
            "livekit_token": livekit_token,
            "avaluma_key": self._license_key,
            "avaluma_avatar_id": avatar_id,
        }
        secrets = (self._license_key, livekit_token)
        timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=CONNECT_TIMEOUT_S, sock_read=START_ANSWER_TIMEOUT_S
        )
        last = ""
        for attempt in range(self.attempts):
            try:
                async with self._client().post(
                    self.base_url + START_PATH, json=body, headers=self._headers(), timeout=timeout
                ) as resp:
                    text = await resp.text(errors="replace")
                    status, retry_after = resp.status, _retry_after(resp.headers)
            except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as e:
                last = _describe(e)  # never reached the server: nothing started
            except (TimeoutError, aiohttp.ClientError) as e:
                # The request went out; the session may be starting. Asking again could start
                # a second one, so the caller waits for the avatar to join instead.
                log.warning("%s: start answer lost (%s); waiting for the avatar", self.label, e)
                return AvatarSession(None, avatar_identity, acknowledged=False)
            else:
                if 200 <= status < 300:
                    return self._session_from(text, avatar_identity)
                brief = _brief(text, secrets)
                if status == OVER_LIMIT:
                    raise AvatarOverLimit(
                        f"{self.label} is at its session limit (HTTP 429 {brief})"
                    )
                if status < 500 and status not in TRANSIENT_STATUSES:
                    raise AvatarRejected(
                        f"{self.label} refused to start avatar {avatar_id!r}: HTTP {status} {brief}"
                    )
                last = f"HTTP {status} {brief}"
                if retry_after is not None and attempt + 1 < self.attempts:
                    if retry_after > RETRY_AFTER_CAP_S:
                        break
                    await asyncio.sleep(retry_after)
                    continue
            if attempt + 1 < self.attempts:
                await asyncio.sleep(backoff_delay(attempt))
        raise AvatarUnavailable(f"{self.label} did not start avatar {avatar_id!r}: {last}")

    def _session_from(self, text: str, avatar_identity: str) -> AvatarSession:
        """A 2xx answer started a session whatever its body; a body we cannot read only
        costs us its id (the session is then ended by removing its participant)."""
        data: Any = None
        with contextlib.suppress(ValueError):
            data = json.loads(text) if text.strip() else {}
        if not isinstance(data, dict):
            log.warning("%s: start answer is not a JSON object; session id unknown", self.label)
            return AvatarSession(None, avatar_identity)
        session_id = data.get("session_id")
        identity = data.get("avatar_participant_identity")
        return AvatarSession(
            session_id if isinstance(session_id, str) and session_id else None,
            identity if isinstance(identity, str) and identity else avatar_identity,
        )

    async def stop(self, session: AvatarSession) -> bool:
        """Ask the server to end the session. Avaluma's plugin no longer calls this endpoint
        and servers may answer 404: False then, and the caller makes the avatar leave."""
        if not session.session_id:
            return False
        try:
            async with self._client().post(
                self.base_url + STOP_PATH,
                json={"session_id": session.session_id},
                headers=self._headers(),
                timeout=aiohttp.ClientTimeout(total=STOP_TIMEOUT_S),
            ) as resp:
                await resp.read()
                return 200 <= resp.status < 300
        except (TimeoutError, aiohttp.ClientError) as e:
            log.info("%s: stop-avatar failed: %s", self.label, _describe(e))
            return False

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession()
        return self._session

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()


def _retry_after(headers: Any) -> float | None:
    value = headers.get("Retry-After")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None  # an HTTP date: fall back to our own backoff


def _describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


def _brief(text: str, secrets: tuple[str, ...], limit: int = 200) -> str:
    """The server's error text for humans: one line, short, with our secrets blanked (a
    server may echo the request, license key and token included)."""
    text = " ".join(text.split())
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text if len(text) <= limit else text[:limit] + "…"
