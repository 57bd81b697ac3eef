"""Start and stop an avatar session on the Avaluma avatar server.

Speaks the small HTTP protocol of avaluma-livekit-plugin ourselves (the plugin is not on PyPI
and is tied to an AgentSession); `AvatarClient` is the seam where an installed plugin could
be used instead. The license key comes from settings, never from the job.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Protocol

import aiohttp

from avatarq.errors import AvatarRejected, AvatarUnavailable
from tasks.backoff import backoff_delay

START_PATH = "/v1/livekit/start-avatar"
STOP_PATH = "/v1/livekit/stop-avatar"
#: Header the avatar server reads the license key from.
LICENSE_HEADER = "api-secret"
REQUEST_TIMEOUT_S = 15.0


@dataclass(frozen=True)
class AvatarSession:
    session_id: str | None
    participant_identity: str


class AvatarClient(Protocol):
    async def start(
        self, *, livekit_url: str, livekit_token: str, avatar_id: str, avatar_identity: str
    ) -> AvatarSession: ...

    async def stop(self, session: AvatarSession) -> None: ...

    async def aclose(self) -> None: ...


class HttpAvatarClient:
    """The Avaluma avatar server's HTTP API: POST start-avatar / stop-avatar."""

    def __init__(
        self,
        base_url: str,
        license_key: str,
        *,
        attempts: int = 4,
        session: aiohttp.ClientSession | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._license_key = license_key
        self.attempts = max(1, attempts)
        self._session = session

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
        url = self.base_url + START_PATH
        last = ""
        for attempt in range(self.attempts):
            if attempt:
                await asyncio.sleep(backoff_delay(attempt - 1))
            try:
                async with self._client().post(
                    url,
                    json=body,
                    headers=self._headers(),
                    timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S),
                ) as resp:
                    text = await resp.text()
                    if 400 <= resp.status < 500:
                        raise AvatarRejected(
                            f"avatar server refused to start avatar {avatar_id!r}: "
                            f"HTTP {resp.status} {_brief(text)}"
                        )
                    if resp.status >= 500:
                        last = f"HTTP {resp.status} {_brief(text)}"
                        continue
                    data = await resp.json(content_type=None) if text else {}
            except (TimeoutError, aiohttp.ClientError) as e:
                last = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
                continue
            return AvatarSession(
                session_id=data.get("session_id") if isinstance(data, dict) else None,
                participant_identity=(
                    data.get("avatar_participant_identity") if isinstance(data, dict) else None
                )
                or avatar_identity,
            )
        raise AvatarUnavailable(
            f"avatar server {self.base_url} unreachable after {self.attempts} attempts: {last}"
        )

    async def stop(self, session: AvatarSession) -> None:
        """Best effort: the avatar also leaves by itself once the room empties."""
        if not session.session_id:
            return
        try:
            async with self._client().post(
                self.base_url + STOP_PATH,
                json={"session_id": session.session_id},
                headers=self._headers(),
                timeout=aiohttp.ClientTimeout(total=5.0),
            ) as resp:
                await resp.read()
        except (TimeoutError, aiohttp.ClientError):
            pass

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession()
        return self._session

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()


def _brief(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "…"
