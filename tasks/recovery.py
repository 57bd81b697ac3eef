"""Recovery from a dead worker within seconds, without waiting for the broker.

Each worker process keeps a heartbeat and the deliveries it holds in Redis; every live
process sweeps, and one of them takes a dead process's deliveries, frees their leases, stops
their avatars and publishes them again. The sweep also sends again what no worker will: a
parked job nobody hands on, a message the broker lost on its way to a worker. Why and how
fast: docs/guarantees.md (2, 9)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from avatarq import redisclient
from avatarq.errors import InvalidJob
from avatarq.jobs import parse_job
from avatarq.ledger.sweeps import Orphan, OrphanWebhook, Sweeps
from avatarq.ledger.types import Handoff, Parked, job_id_of
from avatarq.ledger.worker import Ledger
from avatarq.settings import Settings
from tasks.link import room as rooms
from tasks.link.avatar import HttpAvatarClient
from tasks.link.types import AvatarSession
from tasks.report import WebhookOutbox
from tasks.runtime import get_loop_thread

log = logging.getLogger("avatarq.recovery")

#: The heartbeat is renewed this often (it expires after avatarq.ledger.keys.HEARTBEAT_TTL_S).
HEARTBEAT_S = 1.0
#: Every live worker process looks for dead ones this often.
SWEEP_S = 2.0
#: A delivery sent back through the broker that nobody received this long after it was due
#: is sent again (it can be lost between the broker and a worker killed as it took it), at
#: most `RESENDS` times, each wait twice the last.
RESEND_AFTER_S = 30.0
RESENDS = 5
#: A registered job that no worker has claimed, whose message went into the broker this long
#: before the broker's oldest message (or before now, with the queue empty), was lost on its
#: way to a worker and is sent again: the Redis broker hands a message over (BRPOP) without
#: an acknowledgement, so a connection that drops at that moment loses it. A worker claims a
#: message within milliseconds of taking it; a copy sent on a false alarm, the ledger drops.
LOST_AFTER_S = 10.0


@dataclass
class Sent:
    """A delivery this process sent back through the broker, held until someone has it."""

    job_id: str
    payload: Any
    resend_at: float
    tries: int = 0


#: Publishes a payload again as the render task under the given task id.
Publish = Callable[[str, Any], None]
#: The task ids of the broker's oldest queued messages ([] when none), or None when the
#: broker cannot be read that way (tasks/brokerqueue.py).
Peek = Callable[[], list[str] | None]


class Presence:
    """This worker process in Redis: its heartbeat and the deliveries it holds."""

    def __init__(self, settings: Settings, publish: Publish, peek: Peek | None = None) -> None:
        self.settings = settings
        self.publish = publish
        self.peek = peek
        self.worker_id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        #: task id -> payload JSON of every delivery this process holds (Redis mirrors it).
        self.held: dict[str, str] = {}
        #: Task ids let go since the last heartbeat (removed from Redis by name).
        self._gone: set[str] = set()
        #: Jobs this process parked in their rooms' lanes, held until they end or play.
        self.parked: dict[str, Parked] = {}
        #: Deliveries it sent back through the broker, held until someone else has them.
        self.sent: dict[str, Sent] = {}
        self._counts: dict[str, int] = {}
        #: The session quota of each avatar server, as configured here: announced with the
        #: heartbeat, so every worker process keeps to the smallest a live one has.
        self.quotas = settings.session_quotas()
        self._quotas_seen: dict[str, list[int]] = {}
        #: The process's webhooks: its jobs' and those it took over from dead workers, each
        #: owed in its name until delivered.
        self.webhooks = WebhookOutbox(settings, self._webhook_delivered)
        self._held_lock = threading.Lock()
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._redis: aioredis.Redis | None = None

    @property
    def redis(self) -> aioredis.Redis:
        if self._redis is None:
            self._redis = redisclient.async_client(self.settings.redis_url)
        return self._redis

    @cached_property
    def ledger(self) -> Ledger:
        return Ledger(self.redis, stale_after_s=self.settings.redelivery_after_s)

    @cached_property
    def sweeps(self) -> Sweeps:
        return Sweeps(self.ledger)

    def start(self) -> None:
        """Start the heartbeat and the sweeper on this process's event loop."""
        loop = get_loop_thread()
        loop.submit(self._spawn())

    async def _spawn(self) -> None:
        self._loop = asyncio.get_running_loop()
        for body in (self._beat, self._sweep):
            task = asyncio.create_task(body())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def new_token(self) -> str:
        return Ledger.new_token(self.worker_id)

    def hold(self, task_id: str, payload: Any) -> None:
        """This process received a delivery (a countdown retry too: Celery holds it
        unacknowledged until it is due). Counted: one process may hold two copies of it."""
        with self._held_lock:
            self._counts[task_id] = self._counts.get(task_id, 0) + 1
            self.held[task_id] = body = json.dumps(payload)
            self._gone.discard(task_id)
        if self._loop is not None:  # started: write it now, not only at the next heartbeat
            asyncio.run_coroutine_threadsafe(self._write_held(task_id, body), self._loop)

    def park(self, task_id: str, parked: Parked) -> None:
        """A delivery parked its job in its room's lane: hold it (once more than the
        delivery did, which lets go as it ends) until the job ends or plays elsewhere."""
        self.hold(task_id, parked.payload)
        with self._held_lock:
            self.parked[task_id] = parked

    def sent_back(self, task_id: str, payload: Any, due_in: float) -> None:
        """A delivery went back through the broker (retry, requeue, hand-back, recovery):
        hold it (once more than the delivery did) until another delivery has it."""
        self.hold(task_id, payload)
        resend_at = time.monotonic() + due_in + RESEND_AFTER_S
        with self._held_lock:
            self.sent[task_id] = Sent(job_id_of(payload, task_id), payload, resend_at)

    async def _follow_sent(self) -> None:
        """Let go of what was received; send again what was lost on the way."""
        with self._held_lock:
            sent = dict(self.sent)
            # Received by this process again (held twice), or parked by it: it has it.
            here = {t for t in sent if self._counts.get(t, 0) > 1 or t in self.parked}
        seen = here | await self.sweeps.seen(self.worker_id, {t: s.job_id for t, s in sent.items()})
        now = time.monotonic()
        for task_id, entry in sent.items():
            if task_id not in seen and now < entry.resend_at:
                continue
            if task_id not in seen and entry.tries < RESENDS:
                log.warning("delivery %s: sent back %.0f s ago and not received; sending it again",
                            task_id, RESEND_AFTER_S)  # fmt: skip
                if await self._publish(task_id, entry.payload):
                    entry.tries += 1
                    entry.resend_at = now + RESEND_AFTER_S * 2**entry.tries
                continue
            with self._held_lock:
                self.sent.pop(task_id, None)
            self.let_go(task_id)

    def hand_back_parked(self) -> None:
        """The process is leaving: publish its parked jobs again now (other workers park
        them in turn), instead of after its heartbeat lapsed."""
        with self._held_lock:
            parked, self.parked = self.parked, {}
        for task_id, job in parked.items():
            try:
                self.publish(task_id, job.payload)
            except Exception:
                log.exception("parked job %s: not handed back; recovery will", job.job_id)
                continue
            self.let_go(task_id)

    def let_go(self, task_id: str) -> None:
        """A delivery is over (ended, retried or dropped); the next heartbeat syncs Redis."""
        with self._held_lock:
            count = self._counts.pop(task_id, 0) - 1
            if count > 0:
                self._counts[task_id] = count
            else:
                self.held.pop(task_id, None)
                self._gone.add(task_id)

    async def _write_held(self, task_id: str, payload: str) -> None:
        with suppress(RedisError, OSError):  # the next heartbeat writes it anyway
            await self.ledger.hold(self.worker_id, task_id, payload)

    async def _beat(self) -> None:
        while True:
            try:
                await self.beat_once()
            except (RedisError, OSError) as e:
                log.warning("heartbeat: Redis unreachable: %s", e)
            await asyncio.sleep(HEARTBEAT_S)

    async def beat_once(self) -> None:
        with self._held_lock:
            held, gone = dict(self.held), set(self._gone)
        live = await self.ledger.announce(self.worker_id, held, gone, self.quotas)
        self._warn_of_other_quotas(live)
        with self._held_lock:
            self._gone -= gone - set(self.held)
            parked = dict(self.parked)
        kept = await self.sweeps.keep_parked(parked)
        for task_id in set(parked) - kept:
            with self._held_lock:
                self.parked.pop(task_id, None)
            self.let_go(task_id)
        await self._follow_sent()

    def _warn_of_other_quotas(self, live: dict[str, list[int]]) -> None:
        """Once per change: live workers configured with other quotas for a server (each
        process keeps to the smallest, so a mistyped one holds the whole fleet back)."""
        for server, limits in live.items():
            if len(limits) > 1 and limits != self._quotas_seen.get(server):
                log.warning(
                    "avatar server %r: live workers are configured with different session "
                    "quotas %s (this one %d); the fleet keeps to %d",
                    server, limits, self.quotas[server], limits[0],
                )  # fmt: skip
            self._quotas_seen[server] = limits

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_S)
            try:
                await self.sweep_once()
            except (RedisError, OSError) as e:
                log.warning("recovery sweep: Redis unreachable: %s", e)

    async def sweep_once(self) -> list[str]:
        """Recover the deliveries of every dead worker process, the parked jobs that no
        room's job will hand on and the messages the broker lost; returns their task ids."""
        sweeps = self.sweeps
        dead = await sweeps.take_orphans(self.worker_id)
        for webhook in dead.webhooks:
            self._deliver_owed(webhook)
        orphans = dead.deliveries
        for orphan in orphans:
            await self._recover(sweeps, orphan)
        stranded = await sweeps.take_stranded()
        for handoff in stranded:
            log.warning("job %s: parked with nobody to hand it on; publishing it", handoff.task_id)
            if await self._publish(handoff.task_id, handoff.payload):
                self.sent_back(handoff.task_id, handoff.payload, 0.0)
            else:
                await self.ledger.park(str(handoff.payload.get("room", "")), handoff)
        lost = await self._resend_lost(sweeps)
        return [orphan.task_id for orphan in orphans] + [h.task_id for h in stranded + lost]

    async def _resend_lost(self, sweeps: Sweeps) -> list[Handoff]:
        """Send again the registered jobs whose message left the broker but reached no
        worker: none claimed or holds them, and the broker's oldest message went in well
        after theirs."""
        now = time.time()
        if self.peek is None or not await sweeps.unseen_before(now - LOST_AFTER_S):
            return []
        try:
            oldest = await asyncio.to_thread(self.peek)
        except Exception as e:  # the broker is down: its connection's own errors
            log.warning("recovery sweep: the broker's queue cannot be read: %s", e)
            return []
        went_in = None if oldest is None else await sweeps.registered_at(oldest)
        if went_in is None:
            return []  # a broker that cannot be read, or an oldest message no job registered
        lost = await sweeps.take_lost(min([now, *went_in]) - LOST_AFTER_S)
        for handoff in lost:
            log.warning("job %s: its message left the broker and reached no worker; sending it "
                        "again", handoff.task_id)  # fmt: skip
            await self._publish(handoff.task_id, handoff.payload)
        return lost

    def _deliver_owed(self, webhook: OrphanWebhook) -> None:
        """A dead worker's webhook, now owed by this one, delivered beside the sweep (a slow
        receiver must not hold up recovery); at least once: that worker may have sent it as
        it died, and this one may die before noting it delivered."""
        log.warning("job %s: its worker died owing its webhook; delivering it", webhook.job_id)
        room = json.loads(webhook.record).get("room") or webhook.job_id
        self.webhooks.send(webhook.job_id, room, webhook.url, webhook.record.encode())

    async def _webhook_delivered(self, job_id: str) -> None:
        await self.ledger.webhook_delivered(self.worker_id, job_id)

    async def _recover(self, sweeps: Sweeps, orphan: Orphan) -> None:
        task_id = orphan.task_id
        log.warning("delivery %s: its worker died; publishing it again", task_id)
        body = json.loads(orphan.payload)
        if orphan.playing:
            job_id = job_id_of(body, task_id)
            with suppress(RedisError, OSError):
                note = await sweeps.avatar_session(job_id)
                if note is not None:
                    await stop_avatar_session(self.settings, *note)
                    await sweeps.forget_avatar_session(job_id)
            await self._evict_avatar(body)
        # Followed even when the broker refused it: a job handed on from its lane has no
        # message of its own to come back by, and is sent again until a worker has it.
        await self._publish(task_id, body)
        self.sent_back(task_id, body, 0.0)

    async def _publish(self, task_id: str, body: Any) -> bool:
        try:
            await asyncio.to_thread(self.publish, task_id, body)
            return True
        except Exception:
            # The caller keeps the job: following it to send it again, or back in its lane.
            log.exception("delivery %s: could not publish it again", task_id)
            return False

    async def _evict_avatar(self, payload: Any) -> None:
        """Make the dead worker's avatar leave the room before the job plays again: a new
        avatar joining under the same identity would knock it out, and that reads as the new
        one leaving. The dead job held the room, so no other job's avatar is there."""
        try:
            job = parse_job(payload, self.settings)
        except InvalidJob:
            return
        s = self.settings
        await rooms.remove_participant(
            s.livekit_url,
            s.livekit_api_key,
            s.livekit_api_secret.get_secret_value(),
            room=job.room,
            identity=job.avatar_identity,
        )


async def stop_avatar_session(settings: Settings, server: str, session_id: str | None) -> None:
    """Stop an orphaned avatar session on the server of that name. Names resolve through the
    settings only, so the license key never goes to a URL read back from Redis."""
    try:
        configured = settings.avatar_server(server)
    except KeyError:
        log.warning("orphaned avatar session %s: no avatar server named %r", session_id, server)
        return
    if session_id is None:
        return
    client = HttpAvatarClient(
        server, configured.base_url, settings.avatar_license_key(configured), attempts=1
    )
    try:
        await client.stop(AvatarSession(session_id, participant_identity=""))
    finally:
        await client.aclose()


_lock = threading.Lock()
_presence: tuple[int, Presence] | None = None


def get_presence(settings: Settings, publish: Publish, peek: Peek | None = None) -> Presence:
    """This process's presence, started on first use (and again in a forked child).

    It lives in the process that consumes from the broker: with the threads pool (the
    default) or solo, that is where jobs play. A prefork parent never learns when its
    children finish a job, so with `-P prefork` nothing is held, and a dead worker's jobs
    come back by the broker's own rules (RabbitMQ: at once; Redis: the visibility timeout)."""
    global _presence
    with _lock:
        if _presence is None or _presence[0] != os.getpid():
            _presence = (os.getpid(), Presence(settings, publish, peek))
            _presence[1].start()
        return _presence[1]
