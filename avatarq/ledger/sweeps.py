"""What a live worker process's recovery sweep reads and takes from the ledger: whether
the deliveries it sent back are answered for, the jobs it parked, and what others left (a dead
process's deliveries and owed webhooks, stranded lanes, messages the broker lost). Each take
returns an item to one caller only. Why each exists: docs/guarantees.md."""

from __future__ import annotations

import json
import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

from avatarq.ledger.keys import (
    LANES_KEY,
    UNSEEN_KEY,
    WORKERS_KEY,
    job_avatar_key,
    job_checkpoint_key,
    job_enqueued_key,
    job_lease_key,
    job_record_key,
    room_agent_key,
    room_holder_key,
    room_lane_key,
    room_order_key,
    worker_heartbeat_key,
    worker_held_key,
    worker_webhooks_key,
)
from avatarq.ledger.scripts import Lua, script
from avatarq.ledger.types import Handoff, Parked, handoff_of, lane_entry
from avatarq.ledger.worker import Ledger


@dataclass(frozen=True)
class Orphan:
    """A delivery its dead worker held."""

    #: Its Celery task id: the job id, unless the message named another job's id.
    task_id: str
    payload: str
    #: It held the job's lease: its avatar may still be in the room.
    playing: bool


@dataclass(frozen=True)
class OrphanWebhook:
    """A webhook its dead worker recorded the job's end for and did not deliver."""

    job_id: str
    url: str
    #: The job's terminal record, the webhook's body.
    record: str


@dataclass(frozen=True)
class Orphans:
    """What dead worker processes left: the deliveries they held, the webhooks they owed."""

    deliveries: list[Orphan]
    webhooks: list[OrphanWebhook]


class Sweeps:
    """The recovery side of `ledger`, on its Redis."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self.redis = ledger.redis
        self._take_orphans = script(self.redis, Lua.TAKE_ORPHANS)
        self._take_stranded = script(self.redis, Lua.TAKE_STRANDED)
        self._take_lost = script(self.redis, Lua.TAKE_LOST)
        self._lanes_keep = script(self.redis, Lua.LANES_KEEP)
        self._seen = script(self.redis, Lua.SEEN)

    async def avatar_session(self, job_id: str) -> tuple[str, str | None] | None:
        """The (server, session id) noted for the job, if any."""
        note: dict[bytes, bytes] = await self.redis.hgetall(job_avatar_key(job_id))  # type: ignore[assignment,misc]
        if b"server" not in note:
            return None
        return note[b"server"].decode(), note.get(b"session_id", b"").decode() or None

    async def forget_avatar_session(self, job_id: str) -> None:
        await self.redis.delete(job_avatar_key(job_id))

    async def take_orphans(self, caller: str) -> Orphans:
        """Every unfinished delivery held by a worker process whose heartbeat is gone, and
        every webhook it owed; each is returned to one caller only, which must publish the
        delivery again, or deliver the webhook (owed by worker process `caller` from now)."""
        prefixes = [worker_heartbeat_key(""), worker_held_key(""), job_lease_key(""),
                    job_record_key(""), job_checkpoint_key(""),
                    worker_webhooks_key("")]  # fmt: skip
        keys = [WORKERS_KEY, worker_webhooks_key(caller)]
        held, owed = await self._take_orphans(keys=keys, args=prefixes)
        return Orphans(
            [
                Orphan(held[i].decode(), held[i + 1].decode(), bool(held[i + 2]))
                for i in range(0, len(held), 3)
            ],
            [
                OrphanWebhook(owed[i].decode(), owed[i + 1].decode(), owed[i + 2].decode())
                for i in range(0, len(owed), 3)
            ],
        )

    async def keep_parked(self, parked: Mapping[str, Parked]) -> set[str]:
        """Of the jobs this process parked (task id → `Parked`), those still its to keep: the
        others ended or play. Each kept one is put back in its lane if Redis lost it."""
        if not parked:
            return set()
        prefixes = [job_record_key(""), job_lease_key(""), room_lane_key(""), room_order_key("")]
        args: list[str] = [*prefixes, job_enqueued_key(""), f"{time.time():.3f}"]
        for task_id, p in parked.items():
            args += [task_id, p.job_id, p.room, lane_entry(task_id, p.payload)]
        flat: list[Any] = await self._lanes_keep(keys=[LANES_KEY], args=args)
        return {flat[i].decode() for i in range(0, len(flat), 2) if int(flat[i + 1])}

    async def seen(self, worker_id: str, sent: Mapping[str, str]) -> set[str]:
        """Of the deliveries this process sent back through the broker (task id → job id),
        those someone answers for now: ended, playing, or held by another live process."""
        if not sent:
            return set()
        prefixes = [job_record_key(""), job_lease_key(""), worker_held_key(""),
                    worker_heartbeat_key("")]  # fmt: skip
        args = [*prefixes, worker_id, *(x for pair in sent.items() for x in pair)]
        flat: list[Any] = await self._seen(keys=[WORKERS_KEY], args=args)
        return {flat[i].decode() for i in range(0, len(flat), 2) if int(flat[i + 1])}

    async def take_stranded(self) -> list[Handoff]:
        """Parked jobs at the head of a room nobody plays (the previous head ended without
        handing on, or was lost); each is returned to one caller only, which must publish it
        again."""
        rooms: set[bytes] = await self.redis.smembers(LANES_KEY)  # type: ignore[misc,assignment]
        for room in rooms:
            await self.ledger.drop_finished_heads(None, room.decode())
        prefixes = [room_lane_key(""), room_order_key(""), room_holder_key(""), room_agent_key("")]
        entries: list[bytes] = await self._take_stranded(keys=[LANES_KEY], args=prefixes)
        return [handoff_of(entry) for entry in entries]

    async def unseen_before(self, at: float) -> bool:
        """Whether a registered job no worker has claimed went into the broker before `at`."""
        first = await self.redis.zrangebyscore(UNSEEN_KEY, "-inf", f"({at:.3f}", start=0, num=1)
        return bool(first)

    async def registered_at(self, job_ids: Collection[str]) -> list[float] | None:
        """When each of these jobs was registered; None if one of them was not (or its
        registration is gone)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.hget(job_enqueued_key(job_id), "ts")
            stamps: list[bytes | None] = await pipe.execute()
        known = [float(ts) for ts in stamps if ts is not None]
        return known if len(known) == len(stamps) else None

    async def take_lost(self, before: float, limit: int = 100) -> list[Handoff]:
        """Registered jobs that no worker has claimed or holds and whose message went into
        the broker before `before`; each is returned to one caller only, which must send it
        again (it is listed again as sent now)."""
        prefixes = [job_record_key(""), job_enqueued_key(""), worker_held_key(""),
                    worker_heartbeat_key("")]  # fmt: skip
        args: list[str | int] = [f"{before:.3f}", f"{time.time():.3f}", limit, *prefixes]
        flat: list[bytes] = await self._take_lost(keys=[UNSEEN_KEY, WORKERS_KEY], args=args)
        return [Handoff(flat[i].decode(), json.loads(flat[i + 1])) for i in range(0, len(flat), 2)]
