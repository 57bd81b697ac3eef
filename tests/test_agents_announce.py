"""A room held by a conversational agent, against a real Redis: the workers' claims park its
jobs for the agent, the agent claims them in the room's order, the recovery sweep leaves them
to it, and once its hold is gone (freed or lapsed) they are the workers' again. Then the
agent's link alone: when a job may take the avatar from the conversation."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest
import redis

from avatarq.budget import Budget
from avatarq.errors import PermanentJobError
from avatarq.jobs import parse_job
from avatarq.ledger.keys import room_agent_key
from avatarq.ledger.sweeps import Sweeps
from avatarq.ledger.types import Claim, Handoff
from avatarq.ledger.worker import Ledger
from avatarq.results import Timestamps
from avatarq.settings import Settings
from avatarq_agents.lane import RoomLane
from avatarq_agents.turns import AgentLinks
from tasks.link.types import LinkRequest
from tests.test_lanes import done, enqueued_room, run

AGENT = "agent-host-1-abc123"


def park(job_id: str, room: str) -> Handoff:
    return Handoff(job_id, {"job_id": job_id, "room": room})


def test_a_held_rooms_jobs_park_for_its_agent_who_plays_them_in_order(redis_server: str) -> None:
    room, ids = enqueued_room(redis_server, 2)

    async def body(ledger: Ledger) -> list[Any]:
        assert await ledger.hold_room(room, AGENT)
        assert not await ledger.hold_room(room, "agent-other")  # one agent per room
        seen: list[Any] = []
        # A worker's claim parks even the room's first job: no second avatar in the room.
        for job_id in ids:
            seen.append((await ledger.claim(job_id, room, "w1/a", park=park(job_id, room)))[0])
        head = await ledger.parked_head(room)
        seen.append(head.task_id if head else None)
        # The agent claims the head; the second is not its turn yet, so it stays parked.
        token = Ledger.new_token(AGENT)
        seen.append((await ledger.claim(ids[1], room, token, park=park(ids[1], room)))[0])
        seen.append((await ledger.claim(ids[0], room, token))[0])
        finish = await ledger.finish(ids[0], room, done(ids[0]), token=token)
        seen.append(finish.next.task_id if finish.next else None)
        seen.append(await Sweeps(ledger).take_stranded())  # the agent's to play, not the workers'
        return seen

    parked, ok = Claim.PARKED, Claim.OK
    assert run(redis_server, body) == [parked, parked, ids[0], parked, ok, ids[1], []]


def test_a_freed_or_lapsed_hold_gives_the_lane_back_to_the_workers(redis_server: str) -> None:
    room, ids = enqueued_room(redis_server, 1)

    async def body(ledger: Ledger) -> list[Any]:
        await ledger.hold_room(room, AGENT)
        await ledger.claim(ids[0], room, "w1/a", park=park(ids[0], room))
        await ledger.free_room(room, "agent-other")  # not its hold: nothing changes
        kept = await Sweeps(ledger).take_stranded()
        await ledger.free_room(room, AGENT)
        # The recovery sweep publishes the parked head again, for any worker.
        freed = [h.task_id for h in await Sweeps(ledger).take_stranded()]
        # An agent that died: its hold lapses, and the job's next delivery plays at once.
        await ledger.hold_room(room, AGENT)
        parked, _ = await ledger.claim(ids[0], room, "w2/b", park=park(ids[0], room))
        await ledger.redis.pexpire(room_agent_key(room), 1)
        await asyncio.sleep(0.01)
        return [kept, freed, parked, (await ledger.claim(ids[0], room, "w2/b"))[0]]

    assert run(redis_server, body) == [[], ids, Claim.PARKED, Claim.OK]


def test_an_agent_holding_a_room_announces_its_session_quota(redis_server: str) -> None:
    """The agent's avatar takes a slot of the fleet's quota, so the fleet keeps to the quota
    the agent is configured with too (a worker configured higher takes no more)."""
    # A database of its own: no other test's heartbeat announces a quota in it.
    own = redis_server.rsplit("/", 1)[0] + "/9"
    redis.Redis.from_url(own).flushdb()
    settings = Settings(REDIS_URL=own, AVATARQ_AVATAR_MAX_SESSIONS=2)  # type: ignore[call-arg]

    async def go() -> dict[str, list[int]]:
        lane = RoomLane(settings, "agent-quota-room")
        try:
            await lane.hold(patience_s=1.0)
            probe = Ledger(lane.redis, stale_after_s=3600)
            return await probe.announce("a-worker", {}, (), {"default": 10})
        finally:
            await lane.leave()

    assert asyncio.run(go()) == {"default": [2, 10]}


# -- the agent's link, with a stand-in session and output (no rooms) --------------------------


class Speech:
    """Stands in for a `SpeechHandle` playing until `end()`."""

    def __init__(self) -> None:
        self._done = asyncio.Event()

    def done(self) -> bool:
        return self._done.is_set()

    def end(self) -> None:
        self._done.set()

    async def wait_for_playout(self) -> None:
        await self._done.wait()


class Session:
    """Stands in for an `AgentSession` speaking `current_speech`."""

    def __init__(self) -> None:
        self.current_speech: Speech | None = Speech()
        self.interrupted = 0

    def interrupt(self) -> asyncio.Future[None]:
        self.interrupted += 1
        assert self.current_speech is not None
        self.current_speech.end()
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done


def request(settings: Settings, *, interrupt: bool = False, server: str | None = None) -> Any:
    job = parse_job(
        {"room": "r", "avatar_id": "a", "source": "a.wav", "interrupt": interrupt,
         "avatar_server": server},
        settings,
    )  # fmt: skip
    return LinkRequest(
        job, settings.avatar_server(server), Budget.of(job, settings), 1.0, Timestamps(picked=0.0),
        note_session=None, emit=None, stop=asyncio.Event(),  # type: ignore[arg-type]
    )  # fmt: skip


def links(session: Session) -> AgentLinks:
    output = SimpleNamespace(sender=SimpleNamespace(sample_rate=16000), floor=asyncio.Lock())
    return AgentLinks(session, output, "sess-1")  # type: ignore[arg-type]


def test_the_agents_link_waits_for_its_speech_and_its_floor_and_gives_the_floor_back() -> None:
    async def go() -> list[Any]:
        session = Session()
        agent = links(session)
        await agent.output.floor.acquire()  # the agent's segment on the avatar, not reported
        taking = asyncio.create_task(agent.take_warm(request(Settings())))
        await asyncio.sleep(0.05)
        seen: list[Any] = [taking.done()]
        assert session.current_speech is not None
        session.current_speech.end()  # its speech played out...
        await asyncio.sleep(0.05)
        seen.append(taking.done())  # ...yet its segment was not reported
        agent.output.floor.release()
        link = await asyncio.wait_for(taking, 1)
        seen += [link.session_id, agent.output.floor.locked(), session.interrupted]
        await agent.give_back(link, keep=True)
        seen.append(agent.output.floor.locked())  # the agent speaks again
        return seen

    assert asyncio.run(go()) == [False, False, "sess-1", True, 0, False]


def test_a_job_that_interrupts_cuts_the_speech_and_a_job_at_another_rate_fails() -> None:
    servers = {"hifi": {"url": "http://hifi.example:9000", "sample_rate": 24000}}
    settings = Settings(avatar_servers=servers)

    async def go() -> int:
        session = Session()
        agent = links(session)
        await asyncio.wait_for(agent.take_warm(request(settings, interrupt=True)), 1)
        agent.release()
        with pytest.raises(PermanentJobError, match="plays 16000 Hz; avatar server 'hifi'"):
            await agent.take_warm(request(settings, server="hifi"))
        return session.interrupted

    assert asyncio.run(go()) == 1
