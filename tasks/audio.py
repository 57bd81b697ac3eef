"""A job's audio, decoded by ffmpeg (tasks/decode.py) at the avatar's rate; and the next job
of a room made ready while the current one plays, so back-to-back jobs start without the
decoder's start-up."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from avatarq.errors import InvalidJob
from avatarq.jobs import Job
from avatarq.settings import Settings
from tasks.decode import PcmDecoder
from tasks.runahead import RUN_AHEAD_S, RunAhead
from tasks.seams import Audio, AudioSpec
from tasks.source import aresolve

log = logging.getLogger("avatarq.audio")

#: A prepared source nobody opened within this long is closed (its job played elsewhere,
#: was cancelled, or waits for another reason).
PREPARED_TTL_S = 15.0

_Prepared = asyncio.Task[tuple[contextlib.AsyncExitStack, Audio]]


class FfmpegAudio:
    """Opens a job's source: the decoder, which also reads its declared length, the
    length limit held while decoding, a short file failing as truncated_audio, the decoder
    running up to RUN_AHEAD_S ahead of playback (tasks/runahead.py)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._prepared: dict[tuple[str, AudioSpec], _Prepared] = {}

    def prepare(self, job: Job, spec: AudioSpec) -> None:
        """Start opening `job`'s source now; its `open` with the same spec takes it over."""
        key = (job.job_id, spec)
        if key in self._prepared or not isinstance(job.source, str):
            return
        stack = contextlib.AsyncExitStack()

        async def opened() -> tuple[contextlib.AsyncExitStack, Audio]:
            try:
                return stack, await stack.enter_async_context(self._open(job, spec))
            except BaseException:
                await stack.aclose()
                raise

        task = self._prepared[key] = asyncio.get_running_loop().create_task(opened())
        asyncio.get_running_loop().call_later(PREPARED_TTL_S, self._expire, key, task)

    def _expire(self, key: tuple[str, AudioSpec], task: _Prepared) -> None:
        if self._prepared.get(key) is task:
            del self._prepared[key]
            asyncio.get_running_loop().create_task(_discard(task))

    @contextlib.asynccontextmanager
    async def open(self, job: Job, spec: AudioSpec) -> AsyncIterator[Audio]:
        prepared = self._prepared.pop((job.job_id, spec), None)
        if prepared is None:
            async with self._open(job, spec) as audio:
                yield audio
            return
        # Its errors (a missing file, no audio) are this job's, as if it opened now.
        stack, audio = await prepared
        async with stack:
            yield audio

    @contextlib.asynccontextmanager
    async def _open(self, job: Job, spec: AudioSpec) -> AsyncIterator[Audio]:
        if not isinstance(job.source, str):
            # Speech is rendered once by the producer (producers.tts), never by a worker.
            raise InvalidJob("tts sources must be rendered by the producer before they are queued")
        resolved = await aresolve(job.source, self.settings)
        decoder = PcmDecoder(
            resolved,
            sample_rate=spec.sample_rate,
            settings=self.settings,
            max_seconds=spec.max_seconds,
            start_at=spec.start_at,
        )
        max_chunks = max(1, int(RUN_AHEAD_S * spec.sample_rate * 2 / spec.chunk_bytes))
        async with decoder:
            chunks = decoder.chunks(spec.chunk_bytes)
            # Audio that decodes to nothing ends the decoder with DecodeError `no_audio`.
            first = await anext(chunks)
            duration = decoder.expected_seconds = await decoder.declared_seconds()
            async with RunAhead(chunks, max_chunks=max_chunks) as ahead:
                yield Audio(duration, first, aiter(ahead), lambda: decoder.decoded_seconds)


async def _discard(task: _Prepared) -> None:
    try:
        stack, _audio = await task
    except Exception as e:  # noqa: BLE001 - the job that would have met it never came
        log.debug("a prepared source was not used and failed: %s", e)
        return
    await stack.aclose()
