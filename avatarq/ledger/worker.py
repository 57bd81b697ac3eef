"""The worker's side of the ledger: who may play a job, and when.

A terminal record per job id, a renewed lease per attempt, one playing job per room at the
head of its order, each worker process's heartbeat and held deliveries, and the dead-letter
list; what the recovery sweep takes is in `sweeps`. What they guarantee, and why:
docs/guarantees.md and docs/scheduling.md."""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Collection, Mapping
from typing import Any

import redis.asyncio as aioredis

from avatarq.ledger.clock import server_ms
from avatarq.ledger.keys import (
    AVATAR_NOTE_TTL_S,
    DEAD_LETTER_KEY,
    HEARTBEAT_TTL_S,
    LANES_KEY,
    LEASE_TTL_S,
    RECORD_TTL_S,
    UNSEEN_KEY,
    WORKERS_KEY,
    avatar_quota_key,
    job_attempts_key,
    job_avatar_key,
    job_cancel_key,
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
from avatarq.ledger.types import (
    Checkpoint,
    Claim,
    Finish,
    Handoff,
    Progress,
    Span,
    handoff_of,
    lane_entry,
)

log = logging.getLogger("avatarq.ledger")

#: A job that had to put itself into its room's order (its place was lost with Redis's data,
#: or it was sent without `enqueue`) waits this long before it may start: the room's playing
#: job re-asserts its place on its next watch tick (every 0.25 s), well within it.
REJOIN_GRACE_S = 1.5

#: The field of a job's enqueued hash that every claim of one of its deliveries stamps
#: (claim.lua): the job has been in a worker's hands, not only in the broker.
SEEN = "seen"


async def next_job_at_hand(redis: aioredis.Redis, room: str, played: str | None) -> bool | None:
    """Whether the room's next unfinished job after `played` comes to the room's worker at
    once: parked in the lane or handed on (a claim stamped it seen), or registered by its
    producer (`finish` takes it from there); None when the room has no other job."""
    # The order holds the room's unfinished jobs, the one that played last among them until
    # its run records its end.
    ahead = await redis.lrange(room_order_key(room), 0, 1)  # type: ignore[misc]
    following = [job_id.decode() for job_id in ahead if job_id.decode() != played]
    if not following:
        return None
    marks = await redis.hmget(job_enqueued_key(following[0]), [SEEN, "job"])  # type: ignore[misc]
    return any(mark is not None for mark in marks)


def _worker_of(token: str) -> str | None:
    """The worker process a lease token names (`Ledger.new_token`)."""
    worker, sep, _ = token.rpartition("/")
    return worker if sep else None


class Ledger:
    def __init__(self, redis: aioredis.Redis, *, stale_after_s: float) -> None:
        self.redis = redis
        self.stale_after_s = stale_after_s
        self._claim = script(redis, Lua.CLAIM)
        self._watch = script(redis, Lua.WATCH)
        self._release = script(redis, Lua.RELEASE)
        self._finish = script(redis, Lua.FINISH)
        self._room_agent = script(redis, Lua.ROOM_AGENT)

    @staticmethod
    def new_token(worker_id: str) -> str:
        """A lease token for one delivery; it names its worker process, so the lease can be
        freed as soon as that process is known dead."""
        return f"{worker_id}/{uuid.uuid4().hex}"

    async def claim(
        self, job_id: str, room: str, token: str, *, park: Handoff | None = None
    ) -> tuple[Claim, int]:
        """Try to start playing; returns the verdict and, when OK, the attempt number.
        With `park`, a job whose room is playing another job is kept in the room's lane
        (PARKED: its message may be acknowledged) instead of being told to WAIT."""
        await self.drop_finished_heads(job_id, room)
        keys = [
            job_record_key(job_id),
            job_cancel_key(job_id),
            job_lease_key(job_id),
            room_order_key(room),
            job_attempts_key(job_id),
            job_enqueued_key(job_id),
            room_holder_key(room),
            room_lane_key(room),
            LANES_KEY,
            room_agent_key(room),
            UNSEEN_KEY,
        ]
        args: list[str | int | float] = [
            token,
            int(LEASE_TTL_S * 1000),
            job_id,
            f"{time.time():.3f}",
            RECORD_TTL_S,
            REJOIN_GRACE_S,
            lane_entry(park.task_id, park.payload) if park is not None else "",
            room,
        ]
        verdict, attempt = await self._claim(keys=keys, args=args)
        return Claim(verdict.decode() if isinstance(verdict, bytes) else verdict), int(attempt)

    async def drop_finished_heads(self, job_id: str | None, room: str, limit: int = 100) -> None:
        """Unblock the room from heads that ended, or were lost without ending."""
        order = room_order_key(room)
        for _ in range(limit):
            head: bytes | None = await self.redis.lindex(order, 0)  # type: ignore[assignment,misc]
            if head is None or head.decode() == job_id:
                return
            head_id = head.decode()
            if not await self._is_finished_or_lost(head_id, room):
                return
            await self.redis.lrem(order, 1, head_id)  # type: ignore[misc]

    async def _is_finished_or_lost(self, job_id: str, room: str) -> bool:
        if await self.redis.exists(job_record_key(job_id)):
            return True
        if await self.redis.exists(job_lease_key(job_id)):
            return False
        if await self.redis.hexists(room_lane_key(room), job_id):  # type: ignore[misc]
            return False  # parked: its payload is kept, so it is not lost
        # Not playing and untouched for longer than the broker's redelivery window: its message
        # is gone (e.g. a broker that lost its data), so it must not block the room forever.
        seen = await self.redis.hmget(job_enqueued_key(job_id), ["ts", SEEN])  # type: ignore[misc]
        stamps = [float(s) for s in seen if s is not None]
        if stamps and time.time() - max(stamps) > self.stale_after_s:
            log.warning("dropping job %s from its room's order: lost (never ended)", job_id)
            return True
        return False

    async def watch(
        self, job_id: str, room: str, token: str, progress: Progress | None = None
    ) -> tuple[bool, bool]:
        """One tick of a playing job: (cancel requested, the job is still ours). Renews the
        lease and the hold on the room, restoring them (and the job's place at the head of
        the room's order) if Redis lost them, and records the attempt's `progress`."""
        keys = [
            job_lease_key(job_id),
            job_cancel_key(job_id),
            job_record_key(job_id),
            room_order_key(room),
            room_holder_key(room),
            job_checkpoint_key(job_id),
        ]
        at: list[str | int] = ["", "", 0, ""]
        if progress is not None:
            p = progress
            at = [f"{p.position:.3f}", f"{p.sent:.3f}", p.attempt, f"{p.started_at:.3f}"]
        args = [token, int(LEASE_TTL_S * 1000), job_id, *at, RECORD_TTL_S]
        cancel, ours = await self._watch(keys=keys, args=args)
        return bool(cancel), bool(ours)

    async def checkpoint(self, job_id: str) -> Checkpoint:
        """How far the job's earlier attempts got (nothing for a first attempt)."""
        fields: dict[bytes, bytes] = await self.redis.hgetall(job_checkpoint_key(job_id))  # type: ignore[misc,assignment]
        spans = []
        for name, value in fields.items():
            if name.isdigit():
                start, _, end = value.decode().partition(":")
                spans.append(Span(int(name), float(start), float(end)))
        return Checkpoint(
            position=float(fields.get(b"position", b"0")),
            sent=float(fields.get(b"sent", b"0")),
            played_out=fields.get(b"played_out") == b"1",
            spans=tuple(sorted(spans, key=lambda s: s.attempt)),
        )

    async def release(self, job_id: str, room: str, token: str, *, uncount: bool = False) -> bool:
        """Give the job back without ending it; False when the lease was no longer this
        token's (another delivery took the job over: this attempt must say nothing more).
        `uncount`: this claim was no attempt at all (it only waited), so it does not count
        against the job's retries."""
        released = await self._release(
            keys=[job_lease_key(job_id), room_holder_key(room), job_attempts_key(job_id)],
            args=[token, job_id, int(uncount)],
        )
        return bool(released)

    async def note_avatar_session(self, job_id: str, server: str, session_id: str | None) -> None:
        """Remember the avatar session the job started (call right after start-avatar, and
        when a job takes over a warm session), so that if the job's worker dies, recovery
        stops it instead of leaving it running. `server` is the configured server's name."""
        key = job_avatar_key(job_id)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(key, mapping={"server": server, "session_id": session_id or ""})
            pipe.expire(key, AVATAR_NOTE_TTL_S)
            await pipe.execute()

    async def next_in_room(self, room: str) -> Any | None:
        """The payload of the room's next job when its current one's end will hand it on:
        parked in the lane, or registered and seen by no worker yet (to get it ready while
        the current job plays)."""
        ids: list[bytes] = await self.redis.lrange(room_order_key(room), 1, 1)  # type: ignore[misc]
        if not ids:
            return None
        job_id = ids[0].decode()
        entry = await self.redis.hget(room_lane_key(room), job_id)  # type: ignore[misc]
        if entry is not None:
            return json.loads(json.loads(entry)["payload"])
        job, seen = await self.redis.hmget(job_enqueued_key(job_id), ["job", SEEN])  # type: ignore[misc]
        return json.loads(job) if job is not None and seen is None else None

    async def record(self, job_id: str) -> dict[str, Any] | None:
        """The job's terminal record, once it ended."""
        raw = await self.redis.get(job_record_key(job_id))
        return json.loads(raw) if raw is not None else None

    async def owned_by_another(self, job_id: str, payload: Any) -> bool:
        """Whether a valid job owns this id (enqueued with another payload, or claimed by a
        valid delivery): a message that fails validation must not end a job it does not own."""
        registered = await self.redis.hget(job_enqueued_key(job_id), "job")  # type: ignore[misc]
        if registered is not None:
            return bool(json.loads(registered) != payload)
        return bool(await self.redis.exists(job_enqueued_key(job_id)))

    async def finish(
        self,
        job_id: str,
        room: str | None,
        result: dict[str, Any],
        *,
        token: str,
        hand_on: bool = True,
        webhook: str | None = None,
    ) -> Finish:
        """Record the terminal state once, unless another delivery holds the job's lease;
        with `hand_on` (room lanes), the room's next job comes back to be played next by
        this token's worker: parked in the lane, or registered and not yet delivered. A
        `webhook` URL is noted as owed by that worker until `webhook_delivered`."""
        worker = _worker_of(token)
        keys = [
            job_record_key(job_id),
            room_order_key(room or ""),
            job_lease_key(job_id),
            room_holder_key(room or ""),
            job_avatar_key(job_id),
            room_lane_key(room or ""),
            LANES_KEY,
            worker_held_key(worker) if hand_on and worker and room else "",
            job_checkpoint_key(job_id),
            worker_webhooks_key(worker) if webhook and worker else "",
        ]
        args: list[str | int] = [
            json.dumps(result, default=str),
            job_id,
            RECORD_TTL_S,
            token,
            room or "",
            job_enqueued_key(""),
            webhook or "",
            f"{time.time():.3f}",
        ]
        status, task_id, payload = await self._finish(keys=keys, args=args)
        status = int(status)
        handoff = Handoff(task_id.decode(), json.loads(payload)) if task_id else None
        return Finish(recorded=status == 1, ours=status >= 0, next=handoff)

    async def webhook_delivered(self, worker_id: str, job_id: str) -> None:
        """The worker process delivered (or gave up on) the job's webhook."""
        await self.redis.hdel(worker_webhooks_key(worker_id), job_id)  # type: ignore[misc]

    async def park(self, room: str, handoff: Handoff) -> None:
        """Put a job taken from its lane back there (it could not be published)."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(
                room_lane_key(room), handoff.task_id, lane_entry(handoff.task_id, handoff.payload)
            )
            pipe.sadd(LANES_KEY, room)
            await pipe.execute()

    async def hold_room(self, room: str, agent_id: str) -> bool:
        """Hold `room` for a conversational agent (process `agent_id`), or renew its hold, for
        `LEASE_TTL_S`: the room's jobs park for it to play. False: another agent holds it."""
        held = await self._room_agent(
            keys=[room_agent_key(room)], args=["hold", agent_id, int(LEASE_TTL_S * 1000)]
        )
        return bool(held)

    async def free_room(self, room: str, agent_id: str) -> None:
        """Let go of the agent's hold: the room's parked jobs go to the workers again."""
        await self._room_agent(keys=[room_agent_key(room)], args=["free", agent_id, 0])

    async def playing_in(self, room: str) -> str | None:
        """The id of the job playing in `room` now, if one is."""
        holder: bytes | None = await self.redis.get(room_holder_key(room))
        return None if holder is None else holder.decode()

    async def parked_head(self, room: str) -> Handoff | None:
        """The room's first job, if it is parked in the lane (nobody plays it yet)."""
        await self.drop_finished_heads(None, room)
        head: bytes | None = await self.redis.lindex(room_order_key(room), 0)  # type: ignore[assignment,misc]
        if head is None:
            return None
        entry = await self.redis.hget(room_lane_key(room), head.decode())  # type: ignore[misc]
        return None if entry is None else handoff_of(entry)

    async def dead_letter(self, job_payload: Mapping[str, Any], result: Mapping[str, Any]) -> None:
        """Keep a job whose retries ran out where an operator can see and replay it: its
        payload, its failed result and the time, newest first."""
        entry = {"job": job_payload, **result, "ts": time.time()}
        await self.redis.lpush(DEAD_LETTER_KEY, json.dumps(entry))  # type: ignore[misc]

    async def announce(
        self,
        worker_id: str,
        held: Mapping[str, str],
        gone: Collection[str] = (),
        quotas: Mapping[str, int] | None = None,
    ) -> dict[str, list[int]]:
        """The worker process's heartbeat, with every delivery it holds (task id → payload
        JSON) and those it let go since the last one. One transaction, so a Redis that lost
        its data never sees the process without its held deliveries, nor held deliveries
        without a heartbeat. Entries are only added or removed by name: a job handed to the
        process by its room's previous job (`finish`) is never wiped by a beat.

        With `quotas` (avatar server → the session quota this process is configured with),
        each is kept as long as the heartbeat (every process then keeps to the smallest);
        returns the quotas live processes announced, per server."""
        now_ms = await server_ms(self.redis)
        expiry = now_ms + int(HEARTBEAT_TTL_S * 1000)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.set(worker_heartbeat_key(worker_id), "1", px=int(HEARTBEAT_TTL_S * 1000))
            pipe.sadd(WORKERS_KEY, worker_id)
            if gone:
                pipe.hdel(worker_held_key(worker_id), *gone)
            if held:
                pipe.hset(worker_held_key(worker_id), mapping=dict(held))  # type: ignore[arg-type]
            for server, quota in (quotas or {}).items():
                pipe.zadd(avatar_quota_key(server, "limits"), {str(quota): expiry}, gt=True)
                pipe.zrangebyscore(avatar_quota_key(server, "limits"), now_ms, "+inf")
            replies = await pipe.execute()
        live = replies[len(replies) - 2 * len(quotas or {}) + 1 :: 2]
        return {
            server: sorted(int(n) for n in limits)
            for server, limits in zip(quotas or {}, live, strict=True)
        }

    async def hold(self, worker_id: str, task_id: str, payload: str) -> None:
        """One more delivery the worker process holds (before its next heartbeat)."""
        await self.redis.hset(worker_held_key(worker_id), task_id, payload)  # type: ignore[misc]
