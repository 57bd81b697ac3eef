"""Record a job's avatar with LiveKit Egress: a participant egress of `avatar-{id}` to an MP4
file that the Egress deployment stores with its own storage settings, so no credential leaves
avatarq's settings. Used when `AVATARQ_EGRESS_URL` names a LiveKit server that has Egress
(docs/recordings-egress.md)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator

import aiohttp
from livekit import api
from pydantic import BaseModel, ConfigDict

from avatarq.settings import Settings

log = logging.getLogger("avatarq.egress")

#: One short API request; a server that takes longer is better treated as down.
REQUEST_TIMEOUT_S = 10.0
#: How often an egress's state is read while waiting for it to change.
POLL_S = 0.25
#: The server waits up to 15 s for an egress to answer a stop.
STOP_TIMEOUT_S = 20.0
#: Egress reports ACTIVE once it receives the participant's tracks (about 1 s here), or FAILED
#: after 30 s without them (its subscription timeout); the wait outlasts that, so Egress's own
#: verdict comes first and no egress outlives a failed start (it takes no stop before then).
ACTIVE_TIMEOUT_S = 45.0
#: After the stop, the egress drains its pipeline and uploads the file (s); docs say how long.
FINISH_TIMEOUT_S = 120.0

#: Egress's defaults (H.264 1280x720, 30 fps) with Opus, not AAC: Egress encodes AAC with
#: GStreamer's faac, which Debian's GStreamer does not ship; MP4 carries both.
ENCODING = api.EncodingOptions(audio_codec=api.AudioCodec.OPUS)

_ENDED = {
    api.EgressStatus.EGRESS_COMPLETE,
    api.EgressStatus.EGRESS_FAILED,
    api.EgressStatus.EGRESS_ABORTED,
    api.EgressStatus.EGRESS_LIMIT_REACHED,
}


class EgressError(RuntimeError):
    """Egress refused a request, failed, or did not answer in time; the message says which."""


class EgressRecording(BaseModel):
    """The file an egress wrote, as Egress reports it once it ended."""

    model_config = ConfigDict(frozen=True)

    egress_id: str
    #: Where the Egress deployment's storage put it (an S3 URL, or a path on a local store).
    url: str
    duration_s: float
    size_bytes: int
    #: When the file's first moment was recorded (epoch seconds; None if Egress did not say).
    started_at: float | None = None
    #: Egress ended it before the stop (the participant left, a failure, a limit reached): the
    #: file holds what was recorded until then.
    partial: bool
    #: Egress's own word on why it ended early.
    error: str | None = None


def check_destination(destination: str) -> str:
    """`destination` if it is an MP4 path inside the Egress's storage, else ValueError naming
    the problem (Egress itself would accept a path that escapes its storage prefix)."""
    if not destination.endswith(".mp4"):
        raise ValueError(f"an Egress recording's destination must end in .mp4: {destination!r}")
    if destination.startswith("/") or "://" in destination:
        raise ValueError(
            f"an Egress recording's destination is a path in the Egress's own storage, "
            f"not an absolute path or URL: {destination!r}"
        )
    if ".." in destination.split("/"):
        raise ValueError(f"an Egress recording's destination may not contain '..': {destination!r}")
    return destination


class EgressRecorder:
    """Starts and stops participant egresses on the LiveKit server at `url`."""

    def __init__(
        self,
        url: str,
        api_key: str,
        api_secret: str,
        *,
        active_timeout_s: float = ACTIVE_TIMEOUT_S,
        finish_timeout_s: float = FINISH_TIMEOUT_S,
    ) -> None:
        self.url = url
        self._key = api_key
        self._secret = api_secret
        self.active_timeout_s = active_timeout_s
        self.finish_timeout_s = finish_timeout_s

    @classmethod
    def from_settings(cls, settings: Settings) -> EgressRecorder | None:
        """The recorder `AVATARQ_EGRESS_URL` names, or None when it names none."""
        if not settings.egress_url:
            return None
        secret = settings.livekit_api_secret.get_secret_value()
        return cls(settings.egress_url, settings.livekit_api_key, secret)

    @contextlib.asynccontextmanager
    async def _api(
        self, what: str, timeout_s: float = REQUEST_TIMEOUT_S
    ) -> AsyncIterator[api.LiveKitAPI]:
        """The API client for one operation; its errors become EgressError saying `what`."""
        lkapi = api.LiveKitAPI(
            self.url, self._key, self._secret, timeout=aiohttp.ClientTimeout(total=timeout_s)
        )
        try:
            yield lkapi
        except api.TwirpError as e:
            hint = ""
            if e.status == 401 or e.code == api.TwirpErrorCode.UNAUTHENTICATED:
                hint = ": check LIVEKIT_API_KEY / LIVEKIT_API_SECRET"
            raise EgressError(
                f"Egress at {self.url} could not {what}: {e.message or e.code} ({e.status}){hint}"
            ) from None
        except (TimeoutError, aiohttp.ClientError) as e:
            raise EgressError(
                f"Egress at {self.url} could not {what}: {str(e) or type(e).__name__}"
            ) from None
        finally:
            await lkapi.aclose()

    async def start(self, room: str, identity: str, destination: str) -> str:
        """Record `identity`'s camera and microphone in `room` to the MP4 `destination` (a
        path in the Egress's storage); returns the egress id once it records, so audio sent
        after this returns is in the file."""
        request = api.ParticipantEgressRequest(
            room_name=room,
            identity=identity,
            advanced=ENCODING,
            file_outputs=[
                api.EncodedFileOutput(
                    file_type=api.EncodedFileType.MP4, filepath=check_destination(destination)
                )
            ],
        )
        async with self._api(f"record {identity!r} in room {room!r}") as lkapi:
            info = await lkapi.egress.start_participant_egress(request)
        egress_id = info.egress_id
        try:
            info = await self._wait(egress_id, self.active_timeout_s, until_active=True)
        except EgressError:
            with contextlib.suppress(EgressError):
                await self._request_stop(egress_id)
            raise
        if info.status != api.EgressStatus.EGRESS_ACTIVE:
            raise EgressError(
                f"Egress {egress_id} ended before it recorded {identity!r}: "
                f"{api.EgressStatus.Name(info.status)} {info.error}".rstrip()
            )
        log.info("egress %s records %s in room %s to %s", egress_id, identity, room, destination)
        return egress_id

    async def stop(self, egress_id: str) -> EgressRecording:
        """Stop the egress and wait until its file is stored; what Egress says of the file."""
        # One no longer ACTIVE ended on its own (the participant left, a failure, a limit).
        running = (await self._info(egress_id)).status == api.EgressStatus.EGRESS_ACTIVE
        if running:
            running = await self._request_stop(egress_id)
        info = await self._wait(egress_id, self.finish_timeout_s, until_active=False)
        if not info.file_results or info.file_results[0].size <= 0:
            raise EgressError(
                f"Egress {egress_id} stored no file: {api.EgressStatus.Name(info.status)} "
                f"{info.error}".rstrip()
            )
        file = info.file_results[0]
        whole = running and info.status == api.EgressStatus.EGRESS_COMPLETE
        state = api.EgressStatus.Name(info.status)
        return EgressRecording(
            egress_id=egress_id,
            url=file.location,
            duration_s=file.duration / 1e9,  # nanoseconds
            size_bytes=file.size,
            started_at=file.started_at / 1e9 if file.started_at else None,
            partial=not whole,
            error=None if whole else f"{state} before the stop: {info.error or info.details}",
        )

    async def _request_stop(self, egress_id: str) -> bool:
        """Stop it: True, or False when it ended (or began to) on its own meanwhile."""
        try:
            async with self._api(f"stop egress {egress_id}", STOP_TIMEOUT_S) as lkapi:
                await lkapi.egress.stop_egress(api.StopEgressRequest(egress_id=egress_id))
            return True
        except EgressError:
            # One that ended on its own (the participant left, a limit) refuses a stop.
            info = await self._info(egress_id)
            if info.status in _ENDED or info.status == api.EgressStatus.EGRESS_ENDING:
                return False
            raise

    async def _info(self, egress_id: str) -> api.EgressInfo:
        async with self._api(f"read egress {egress_id}") as lkapi:
            found = await lkapi.egress.list_egress(api.ListEgressRequest(egress_id=egress_id))
        if not found.items:
            raise EgressError(f"Egress at {self.url} does not know egress {egress_id}")
        return found.items[0]

    async def _wait(
        self, egress_id: str, timeout_s: float, *, until_active: bool
    ) -> api.EgressInfo:
        """Its state once it has ended (or, `until_active`, once it records); EgressError after
        `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while True:
            info = await self._info(egress_id)
            if info.status in _ENDED or (
                until_active and info.status == api.EgressStatus.EGRESS_ACTIVE
            ):
                return info
            if time.monotonic() >= deadline:
                state = api.EgressStatus.Name(info.status)
                raise EgressError(f"Egress {egress_id} still {state} after {timeout_s:.0f}s")
            await asyncio.sleep(POLL_S)
