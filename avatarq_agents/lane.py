"""Batch jobs into a room whose avatar a conversational `AvatarSession` holds.

The agent's process holds the room in the ledger, so workers park the room's jobs in its lane;
it plays each in turn with the worker's own run (tasks/jobrun.py) and playback, on the agent's
avatar (avatarq_agents/turns.py): the room's playing worker (docs/agents.md)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass

from redis.exceptions import RedisError

from avatarq import redisclient
from avatarq.ledger.types import Handoff, Parked, job_id_of
from avatarq.ledger.worker import Ledger
from avatarq.results import Played
from avatarq.settings import Settings
from avatarq_agents.turns import AgentLinks
from tasks.audio import FfmpegAudio
from tasks.context import PlayContext
from tasks.hooks import worker_hooks
from tasks.jobrun import JobParts, JobRun
from tasks.playback import Playback
from tasks.recovery import HEARTBEAT_S
from tasks.report import JobReporter, WebhookOutbox

log = logging.getLogger("avatarq.agents")

#: How often an idle held room's lane is looked at for a job.
POLL_S = 0.2
#: How long closing waits for the job playing to be handed back (it stops within a watch tick).
CLOSE_GRACE_S = 10.0


class RoomHeld(RuntimeError):
    """Another live agent holds the room's avatar, or a batch job kept playing in it."""


@dataclass
class ThroughAgent:
    """The worker's playback, its result naming the agent that played it."""

    playback: Playback
    agent_id: str

    async def play(self, play: PlayContext) -> Played:
        played = await self.playback.play(play)
        return played.model_copy(update={"agent": self.agent_id})


class RoomLane:
    """Holds a room for its agent and plays the room's jobs through the agent, one at a time in
    the room's order, as the room's playing worker: claim, lease, events, one record."""

    def __init__(self, settings: Settings, room: str) -> None:
        self.settings = settings
        self.room = room
        self.links: AgentLinks | None = None
        #: Its heartbeat and held deliveries are a worker process's, so recovery covers it.
        self.agent_id = f"agent-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.redis = redisclient.async_client(settings.redis_url)
        self.ledger = Ledger(self.redis, stale_after_s=settings.redelivery_after_s)
        #: Announced with each heartbeat: the agent's sessions count against the fleet's
        #: quota, so the fleet keeps to its configured one too.
        self.quotas = settings.session_quotas()
        self.webhooks = WebhookOutbox(
            settings, functools.partial(self.ledger.webhook_delivered, self.agent_id)
        )
        #: What each job's run is given, once the agent's avatar is there (`start`).
        self.parts: JobParts | None = None
        #: task id -> payload JSON of each delivery it holds (Redis mirrors it each beat).
        self._held: dict[str, str] = {}
        self._gone: set[str] = set()
        #: Job id -> when (time.monotonic) a job sent back to the lane may be taken again.
        self._not_before: dict[str, float] = {}
        #: Set by `stop`: no job is taken any more.
        self._closing = False
        #: Set by `leave`: the room is let go.
        self._leaving = False
        #: False while another agent holds the room (this one's hold lapsed): take no job.
        self._holds = True
        #: The heartbeat, which holds the room until `leave`.
        self._tasks: list[asyncio.Task[None]] = []
        self._consuming: asyncio.Task[None] | None = None

    async def hold(self, patience_s: float) -> None:
        """Hold the room, so no worker starts a job in it, then wait up to `patience_s` for
        the batch job playing in it to end. Raises `RoomHeld` when another agent holds the
        room or the job plays on."""
        if not await self.ledger.hold_room(self.room, self.agent_id):
            raise RoomHeld(f"room {self.room!r} is held by another conversational agent")
        await self.ledger.announce(self.agent_id, {}, (), self.quotas)
        self._tasks.append(asyncio.create_task(self._beat()))
        deadline = time.monotonic() + patience_s
        for _ in range(int(patience_s / POLL_S) + 1):
            playing = await self.ledger.playing_in(self.room)
            if playing is None:
                return
            if time.monotonic() >= deadline:
                break
            await asyncio.sleep(POLL_S)
        raise RoomHeld(f"room {self.room!r} still plays batch job {playing} after {patience_s:g}s")

    def start(self, links: AgentLinks) -> None:
        """Play the room's jobs through the agent's avatar (`links`) from now on."""
        settings = self.settings
        self.links = links
        self.parts = JobParts(
            settings=settings,
            ledger=self.ledger,
            reporter=lambda job_id: JobReporter(
                settings, job_id, outbox=self.webhooks, redis=self.redis
            ),
            player=ThroughAgent(
                Playback(settings, audio=FfmpegAudio(settings), links=links), self.agent_id
            ),
            shutting_down=lambda: self._closing,
            hooks=worker_hooks(lambda: self._closing, settings),
            hold=self._hold,
            park=self._parked,
        )
        self._consuming = asyncio.create_task(self._consume())

    def _hold(self, handoff: Handoff) -> None:
        self._held[handoff.task_id] = json.dumps(handoff.payload)
        self._gone.discard(handoff.task_id)

    def _let_go(self, task_id: str) -> None:
        if self._held.pop(task_id, None) is not None:
            self._gone.add(task_id)

    def _parked(self, task_id: str, parked: Parked) -> None:
        self._let_go(task_id)  # not its turn after all: its lane keeps it

    async def _beat(self) -> None:
        while not self._leaving:
            await asyncio.sleep(HEARTBEAT_S)
            gone, self._gone = self._gone, set()
            try:
                await self.ledger.announce(self.agent_id, dict(self._held), gone, self.quotas)
                held = await self.ledger.hold_room(self.room, self.agent_id)
                if self._holds and not held:
                    # Its hold lapsed (Redis unreachable past the lease) and another agent
                    # took the room: that agent plays its jobs until it lets go.
                    log.error("agent %s lost room %s to another agent", self.agent_id, self.room)
                self._holds = held
            except (RedisError, OSError) as e:
                self._gone |= gone
                log.warning("agent %s: ledger unreachable: %s", self.agent_id, e)

    async def _consume(self) -> None:
        while not self._closing:
            if not self._holds:
                await asyncio.sleep(POLL_S)
                continue
            try:
                handoff = await self.ledger.parked_head(self.room)
            except (RedisError, OSError) as e:
                log.warning("agent %s: ledger unreachable: %s", self.agent_id, e)
                handoff = None
            if handoff is None or self._not_yet(handoff):
                await asyncio.sleep(POLL_S)
                continue
            try:
                while handoff is not None and not self._closing:
                    handoff = await self._deliver(handoff)
                if handoff is not None:  # handed on as the agent leaves: back in its lane
                    await self._send_back(handoff)
                else:  # nothing handed on: the lane's head may be one still leased elsewhere
                    await asyncio.sleep(POLL_S)
            except Exception:  # the ledger or the run failed: the conversation goes on
                log.exception("agent %s: a job of room %s did not end", self.agent_id, self.room)
                await self._return_held()
                await asyncio.sleep(POLL_S)

    def _not_yet(self, handoff: Handoff) -> bool:
        due = self._not_before.get(job_id_of(handoff.payload, handoff.task_id), 0.0)
        return time.monotonic() < due

    async def _deliver(self, handoff: Handoff) -> Handoff | None:
        """One job of the room through the agent; returns the room's next, handed to it."""
        assert self.parts is not None and self.links is not None, "consumed once started"
        self._hold(handoff)
        await self.ledger.hold(self.agent_id, handoff.task_id, self._held[handoff.task_id])
        token = Ledger.new_token(self.agent_id)
        try:
            outcome = await JobRun(self.parts, handoff.payload, handoff.task_id, token).run()
        finally:
            self.links.release()
        if outcome.retry_in is not None:
            # A retry, a wait or a hand-back: its turn again in its lane (the room's first), not
            # before its countdown; if the agent leaves, the workers take the lane.
            job_id = job_id_of(handoff.payload, handoff.task_id)
            self._not_before[job_id] = time.monotonic() + outcome.retry_in
            await self._send_back(handoff)
        else:
            self._let_go(handoff.task_id)
        return outcome.next

    async def _send_back(self, handoff: Handoff) -> None:
        await self.ledger.park(self.room, handoff)
        self._let_go(handoff.task_id)

    async def _return_held(self) -> None:
        """Every delivery it still holds back to the lane, so none is lost with this process's
        word for it (one that had ended is never claimed again; its entry expires)."""
        with contextlib.suppress(RedisError, OSError):
            for task_id, payload in list(self._held.items()):
                await self._send_back(Handoff(task_id, json.loads(payload)))

    async def stop(self) -> None:
        """Hand the job playing back to the lane, and the deliveries it held. The room stays
        held (its heartbeat goes on) while the agent's avatar is still in it: `leave`."""
        self._closing = True
        if self._consuming is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(CLOSE_GRACE_S):
                    await asyncio.shield(self._consuming)
            with contextlib.suppress(Exception):  # as before: how it ended is not asked
                await redisclient.cancel_and_wait(self._consuming)
        await self._return_held()

    async def leave(self) -> None:
        """Let go of the room (the workers take its jobs from now on) and of what it held;
        then deliver the webhooks still owed (a process killed meanwhile owes them to the
        fleet's recovery)."""
        await self.stop()
        self._leaving = True
        stopping = map(redisclient.cancel_and_wait, self._tasks)
        await asyncio.gather(*stopping, return_exceptions=True)
        try:
            await self.ledger.free_room(self.room, self.agent_id)
            await self.ledger.announce(self.agent_id, {}, {*self._gone, *self._held})
        except (RedisError, OSError) as e:  # its hold and heartbeat lapse on their own
            log.warning("agent %s: leaving without the ledger: %s", self.agent_id, e)
        await self.webhooks.aclose()
        await self.redis.aclose()
