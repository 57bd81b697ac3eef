"""A room held by a conversational agent, against a real Redis: the workers' claims park its
jobs for the agent, the agent claims them in the room's order, the recovery sweep leaves them
to it, and once its hold is gone (freed or lapsed) they are the workers' again."""

from __future__ import annotations

import asyncio
from typing import Any

from avatarq.ledger.keys import room_agent_key
from avatarq.ledger.worker import Claim, Handoff, Ledger
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
        seen.append(await ledger.take_stranded())  # the agent's to play, not the workers'
        return seen

    parked, ok = Claim.PARKED, Claim.OK
    assert run(redis_server, body) == [parked, parked, ids[0], parked, ok, ids[1], []]


def test_a_freed_or_lapsed_hold_gives_the_lane_back_to_the_workers(redis_server: str) -> None:
    room, ids = enqueued_room(redis_server, 1)

    async def body(ledger: Ledger) -> list[Any]:
        await ledger.hold_room(room, AGENT)
        await ledger.claim(ids[0], room, "w1/a", park=park(ids[0], room))
        await ledger.free_room(room, "agent-other")  # not its hold: nothing changes
        kept = await ledger.take_stranded()
        await ledger.free_room(room, AGENT)
        # The recovery sweep publishes the parked head again, for any worker.
        freed = [h.task_id for h in await ledger.take_stranded()]
        # An agent that died: its hold lapses, and the job's next delivery plays at once.
        await ledger.hold_room(room, AGENT)
        parked, _ = await ledger.claim(ids[0], room, "w2/b", park=park(ids[0], room))
        await ledger.redis.pexpire(room_agent_key(room), 1)
        await asyncio.sleep(0.01)
        return [kept, freed, parked, (await ledger.claim(ids[0], room, "w2/b"))[0]]

    assert run(redis_server, body) == [[], ids, Claim.PARKED, Claim.OK]
