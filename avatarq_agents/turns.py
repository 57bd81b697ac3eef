"""When a batch job may take a conversational agent's avatar: once the agent's current speech
has played (or was cut short, for a job with `interrupt`) and the avatar reported its segment.
The job's link is the agent's own sender; the agent speaks again once it is given back."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable
from dataclasses import dataclass

from livekit.agents import AgentSession

from avatarq.errors import PermanentJobError
from avatarq_agents.output import AvatarAudioOutput
from tasks.control import JobControl
from tasks.link.stream import AudioStreamSender
from tasks.link.types import Link, LinkRequest

log = logging.getLogger("avatarq.agents")

#: How long an `interrupt` job waits for the session to have cut its speech short.
INTERRUPT_TIMEOUT_S = 5.0


@dataclass
class AgentLink:
    """The agent's avatar, lent to one job: the sender the conversation speaks through."""

    sender: AudioStreamSender
    session_id: str | None

    def attach(self, control: JobControl) -> None:
        return None  # the agent's session owns the room and the avatar, and watches them


class AgentLinks:
    """The `LinkSource` of a held room: its one link is the agent's avatar, taken when the
    agent's current speech has played (or was cut short, for a job with `interrupt`) and the
    segment on the avatar has been reported; the agent speaks again once it is given back."""

    def __init__(
        self, session: AgentSession, output: AvatarAudioOutput, session_id: str | None
    ) -> None:
        self.session = session
        self.output = output
        self.session_id = session_id
        self._lent = False

    async def take_warm(self, request: LinkRequest) -> AgentLink:
        sender = self.output.sender
        if request.server.sample_rate != sender.sample_rate:
            raise PermanentJobError(
                f"room {request.job.room!r} is held by a conversational agent whose avatar plays "
                f"{sender.sample_rate} Hz; avatar server {request.server.name!r} is "
                f"{request.server.sample_rate} Hz"
            )
        if request.job.interrupt:
            await self._interrupt()
        speech = self.session.current_speech
        if speech is not None and not speech.done():
            await _until(speech.wait_for_playout(), request.stop)
        # Always taken, even once stopped: the sender serves one segment and one report at a time.
        await self.output.floor.acquire()
        self._lent = True
        return AgentLink(sender, self.session_id)

    start_cold = take_warm

    def joining(self, request: LinkRequest) -> contextlib.nullcontext[None]:
        return contextlib.nullcontext()  # the agent's session is in the room already

    async def give_back(self, link: Link, *, keep: bool) -> None:
        self.release()

    def release(self) -> None:
        """The agent may speak again (idempotent: the lane calls it after every job)."""
        if self._lent:
            self._lent = False
            self.output.floor.release()

    async def _interrupt(self) -> None:
        try:
            done = self.session.interrupt()
        except RuntimeError as e:  # not running, or its speech may not be interrupted: wait
            log.info("agent speech not interrupted for a job: %s", e)
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(INTERRUPT_TIMEOUT_S):
                await asyncio.shield(done)


async def _until(waited: Awaitable[None], stop: asyncio.Event) -> None:
    """Wait for `waited`, or until `stop` is set (the job is cancelled or handed back)."""
    tasks = {asyncio.ensure_future(waited), asyncio.ensure_future(stop.wait())}
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
