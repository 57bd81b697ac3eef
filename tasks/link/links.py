"""Where a job's link comes from, and where it goes after the job.

A job gets an idle link of the same room and avatar kept by this process (tasks/link/warm.py), else
a cold start within the avatar server's session quota (tasks/link/quota.py). Afterwards the link
goes back to the warm pool when it is fit for the next job, and is closed otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator

import redis.asyncio as aioredis

from avatarq.errors import AvatarOverLimit
from avatarq.events import WaitingForAvatar
from avatarq.ledger.keys import job_waiting_key
from avatarq.settings import AvatarServer, Settings
from tasks.link.link import (
    AvatarClientFactory,
    AvatarLink,
    JoinedRoom,
    http_avatar_client,
    join_room,
    open_link,
)
from tasks.link.quota import AvatarQuota, wait_for_slot
from tasks.link.types import Link, LinkRequest, NoAvatarSlot, Waiting
from tasks.link.warm import WarmPool, slot_wanted

#: How long a cold start waits in its worker slot for an avatar session slot (waking on each
#: release) before the job goes back to the queue (its place in the server's line is kept a
#: while). Only a room's head waits here: the room's later jobs wait in its lane.
QUOTA_PATIENCE_S = 30.0
#: A waiting job's status entry outlives the gaps between its polls and requeues.
WAITING_TTL_S = 15


class Links:
    """Hands links to jobs: warm from this process's pool, else cold within the quota."""

    def __init__(
        self,
        settings: Settings,
        redis: aioredis.Redis,
        *,
        avatar_client: AvatarClientFactory = http_avatar_client,
    ) -> None:
        self.settings = settings
        self.redis = redis
        self.avatar_client = avatar_client
        self.pool = WarmPool(redis, lanes=settings.room_lanes)
        self._quotas: dict[str, AvatarQuota] = {}
        #: Rooms joined for cold starts that ended before their avatar was asked for.
        self._leaving: set[asyncio.Task[None]] = set()
        #: Joins begun while a job's source opened (`joining`), by job id, until a cold start
        #: takes them.
        self._early: dict[str, asyncio.Future[JoinedRoom]] = {}

    def quota(self, server: AvatarServer) -> AvatarQuota:
        """This process's handle on the fleet-wide session quota of `server`."""
        quota = self._quotas.get(server.name)
        if quota is None:
            limit = server.max_sessions
            quota = self._quotas[server.name] = AvatarQuota(self.redis, server.name, limit)
        return quota

    @contextlib.asynccontextmanager
    async def joining(self, request: LinkRequest) -> AsyncIterator[None]:
        """Join the room while the job's source opens, unless this process keeps the room's
        avatar warm: a download or an S3 read no longer comes before the join on a cold
        start's way to its first audio. The avatar is still asked for only once the source
        decodes, so a bad one costs no session."""
        if self.pool.holds(request.key):  # parked only with warm avatars on
            yield
            return
        job_id = request.job.job_id
        self._early[job_id] = asyncio.ensure_future(join_room(request, self.settings))
        try:
            yield
        finally:
            self._drop_early(job_id)  # when no start took it

    def _drop_early(self, job_id: str) -> None:
        join = self._early.pop(job_id, None)
        if join is not None:
            self._abandon(join)

    async def take_warm(self, request: LinkRequest) -> AvatarLink | None:
        if self.settings.warm_idle_s <= 0:
            return None
        link = await self.pool.take(request.key)
        if link is not None:
            self._drop_early(request.job.job_id)  # parked after the source began to open
            link.job_id = request.job.job_id
            try:
                await link.cover(request, self.settings)
            except BaseException:
                await link.close()  # out of the pool and not the job's: nobody else would
                raise
        return link

    async def start_cold(self, request: LinkRequest) -> AvatarLink:
        """A cold start within the avatar server's session quota: wait for a slot (briefly:
        `NoAvatarSlot` sends the job back to the queue), then open the link, which holds the
        slot until it closes."""
        job, server = request.job, request.server
        quota = self.quota(server)

        async def on_wait(waiting: Waiting) -> None:
            event = WaitingForAvatar(
                server=server.name,
                place=waiting.place + 1,
                sessions=waiting.sessions,
                quota=waiting.quota,
            )
            await request.emit(event)
            info = json.dumps(event.data())
            await self.redis.set(job_waiting_key(job.job_id), info, ex=WAITING_TTL_S)

        # The room is joined (since the source began to open, or from now) while the job
        # waits for its slot: a room handed a slot then only waits for its avatar.
        joining = self._early.pop(job.job_id, None) or asyncio.ensure_future(
            join_room(request, self.settings)
        )
        try:
            # Before the line: an idle session of this room's avatar that another process
            # keeps (for this very job, the room's next) may hold the slot this job waits for.
            await self.pool.make_room(request.key)
            slot = await wait_for_slot(
                quota, job.job_id, patience_s=QUOTA_PATIENCE_S, on_wait=on_wait, stop=request.stop
            )
        except BaseException:
            self._abandon(joining)
            raise
        # Renewed from now on, not once the avatar is ready: a start slower than the slot's
        # lease would otherwise free the slot of a session that is about to render.
        quota.hold(slot)
        try:
            # Also clears what an earlier, requeued try of this job left.
            await self.redis.delete(job_waiting_key(job.job_id))
            joined = await joining
        except BaseException:
            self._abandon(joining)
            await quota.release(slot)
            raise
        try:
            link = await open_link(request, joined, self.settings, self.avatar_client)
        except AvatarOverLimit as e:
            # Refused under our quota: the server's real limit is lower. Shrink, wait again.
            await quota.release(slot)
            cap = await quota.shrink()
            raise NoAvatarSlot(server.name, Waiting(place=0, sessions=cap, quota=cap)) from e
        except BaseException:
            await quota.release(slot)
            raise
        link.own_slot(quota, slot)
        return link

    def _abandon(self, joining: asyncio.Future[JoinedRoom]) -> None:
        """Leave the room `joining` joins, once it has: a join is never cut off midway (the
        SDK would finish it unseen and leave the worker in the room)."""

        async def leave() -> None:
            with contextlib.suppress(Exception):  # a join that failed left nothing behind
                await (await joining).leave()

        task = asyncio.ensure_future(leave())
        self._leaving.add(task)
        task.add_done_callback(self._leaving.discard)

    async def give_back(self, link: Link, *, keep: bool) -> None:
        """After the job: park a link fit for the next one, close any other."""
        assert isinstance(link, AvatarLink), "Links only takes back the links it gave"
        if keep and self.settings.warm_idle_s > 0 and link.reusable:
            try:
                keep = not await slot_wanted(link, self.redis, lanes=self.settings.room_lanes)
            except BaseException:
                await link.close()
                raise
        if keep:
            await self.pool.park(link, self.settings.warm_idle_s)
        else:
            await link.close()

    async def aclose(self) -> None:
        await self.pool.aclose()
        await asyncio.gather(*self._leaving)
