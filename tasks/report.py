"""Tell the world how a job goes: Redis stream events, Celery PROGRESS state, the terminal
record, and the webhook. Everything written here is built from explicit fields, so no secret
(from settings) can slip into it.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import redis.asyncio as aioredis
from redis.exceptions import RedisError
from redis.typing import EncodableT, FieldT

from avatarq import redisclient
from avatarq.errors import InvalidJob
from avatarq.events import TERMINAL_EVENT, Event, EventPayload, Progress, Status
from avatarq.ledger.keys import job_events_key
from avatarq.results import JobResult
from avatarq.settings import Settings
from avatarq.sourcepolicy import webhook_policy
from tasks import metrics
from tasks.backoff import backoff_delay
from tasks.safehttp import SafeHttp

log = logging.getLogger("avatarq.report")

#: `job.progress` events (the SSE stream, the console's log) at most this often.
PROGRESS_INTERVAL_S = 1.0
#: Celery's PROGRESS state at most this often: `get_status` shows a playing job's latest
#: `job.progress` event, so the state only serves Celery's own readers, and an update costs
#: more than an event (docs/performance.md).
STATE_INTERVAL_S = 5.0
#: A job's own stream keeps its last ~2000 events (about half an hour of progress); the
#: lifecycle events that matter are also in the terminal record and the global stream.
JOB_EVENTS_MAXLEN = 2000
WEBHOOK_ATTEMPTS = 4
WEBHOOK_SIGNATURE_HEADER = "X-Avatarq-Signature"
WEBHOOK_TIMESTAMP_HEADER = "X-Avatarq-Timestamp"


StateUpdater = Callable[[dict[str, Any]], None]


def sign_webhook(secret: str, timestamp: str, body: bytes) -> str:
    """HMAC-SHA256 over `{timestamp}.{body}`, hex; verify it the same way on receipt."""
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


class JobReporter:
    def __init__(
        self,
        settings: Settings,
        job_id: str,
        *,
        update_state: StateUpdater | None = None,
        outbox: WebhookOutbox,
        redis: aioredis.Redis | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.job_id = job_id
        self._outbox = outbox
        self._update_state = update_state
        self._redis = redis or redisclient.async_client(settings.redis_url)
        self._owns_redis = redis is None
        self._clock = clock
        self._last_progress = self._last_state = -math.inf
        self._progress_task: asyncio.Task[None] | None = None

    async def emit(self, payload: EventPayload) -> None:
        """One event of the job, to the global stream and the job's own."""
        metrics.observe(payload)
        await self._write(payload.event, payload.data())

    async def _write(self, event: Event, data: dict[str, Any]) -> None:
        fields: dict[FieldT, EncodableT] = {
            "event": event.value,
            "job_id": self.job_id,
            "ts": f"{time.time():.6f}",
            "data": json.dumps(data, default=str),
        }
        pipe = self._redis.pipeline(transaction=False)
        pipe.xadd(self.settings.events_stream, fields, maxlen=self.settings.events_maxlen)
        pipe.xadd(job_events_key(self.job_id), fields, maxlen=JOB_EVENTS_MAXLEN)
        pipe.expire(job_events_key(self.job_id), self.settings.events_ttl_s)
        try:
            await pipe.execute()
        except RedisError as e:
            # Events are a view on the job; a Redis outage must not cut the audio off.
            log.warning("job %s: event %s not written: %s", self.job_id, event.value, e)

    async def progress(
        self, streamed_s: float, total_s: float | None, *, force: bool = False
    ) -> None:
        """A `job.progress` event at most once a second, and the Celery PROGRESS state at
        most every `STATE_INTERVAL_S`; `force` writes both."""
        now = self._clock()
        if not force and now - self._last_progress < PROGRESS_INTERVAL_S:
            return
        self._last_progress = now
        progress = Progress(seconds_streamed=round(streamed_s, 3), total_seconds=total_s)
        await self.emit(progress)
        meta = progress.data()
        if self._update_state is None or (not force and now - self._last_state < STATE_INTERVAL_S):
            return
        self._last_state = now
        try:
            await asyncio.to_thread(self._update_state, meta)
        except Exception as e:  # the result backend is down: progress can wait
            log.warning("job %s: progress state not stored: %s", self.job_id, e)

    def progress_nowait(self, streamed_s: float, total_s: float | None) -> None:
        """`progress` beside the caller instead of in its way: the audio send loop calls this
        after every chunk, and a report (Redis, then the Celery result backend through a
        thread) took up to 150 ms under load, long enough to starve the avatar. One report
        at a time; one falling due while the previous is still out is skipped."""
        if self._clock() - self._last_progress < PROGRESS_INTERVAL_S:
            return
        if self._progress_task is None or self._progress_task.done():
            self._progress_task = asyncio.create_task(self.progress(streamed_s, total_s))

    async def settle_progress(self) -> None:
        """Wait for the report `progress_nowait` left running, so none lands after the end."""
        if self._progress_task is not None:
            await self._progress_task
            self._progress_task = None

    async def announce(self, result: JobResult, webhook_url: str | None) -> None:
        """Announce the terminal state (already recorded by the ledger); the webhook goes out
        beside what the worker does next (`WebhookOutbox`)."""
        record = result.as_record()
        body = json.dumps(record, default=str)
        metrics.observe(result)
        await self._write(TERMINAL_EVENT[Status(result.status)], record)
        if webhook_url:
            self._outbox.send(self.job_id, result.room or self.job_id, webhook_url, body.encode())

    async def aclose(self) -> None:
        if self._owns_redis:
            await self._redis.aclose()


class WebhookOutbox:
    """The webhooks of one worker process (or agent), sent beside the jobs that follow: a slow
    receiver must not hold up the room's next job, which its lane plays at once. Each room's
    webhooks go out in its jobs' order; `aclose` waits for every one still going out.

    The ledger notes each as owed with the job's end (`Ledger.finish`); `delivered` clears
    it once sent, so a process that dies first leaves it to recovery (tasks/recovery.py)."""

    def __init__(
        self, settings: Settings, delivered: Callable[[str], Awaitable[None]] | None = None
    ) -> None:
        self.settings = settings
        self._delivered = delivered
        #: Per room, its latest webhook still going out: the next one waits for it.
        self._last: dict[str, asyncio.Task[None]] = {}
        self._going: set[asyncio.Task[None]] = set()

    def send(self, job_id: str, room: str, url: str, body: bytes) -> None:
        before = self._last.get(room)
        task = asyncio.get_running_loop().create_task(self._after(before, job_id, url, body))
        self._last[room] = task
        self._going.add(task)
        task.add_done_callback(functools.partial(self._sent, room))

    async def _after(
        self, before: asyncio.Task[None] | None, job_id: str, url: str, body: bytes
    ) -> None:
        if before is not None:
            await asyncio.wait({before})
        await deliver_webhook(self.settings, job_id, url, body)
        if self._delivered is not None:
            try:
                await self._delivered(job_id)
            except (RedisError, OSError) as e:  # owed still: sent again if this process dies
                log.warning("webhook for job %s: delivery not noted: %s", job_id, e)

    def _sent(self, room: str, task: asyncio.Task[None]) -> None:
        self._going.discard(task)
        if self._last.get(room) is task:
            del self._last[room]

    async def aclose(self) -> None:
        await asyncio.gather(*self._going, return_exceptions=True)


async def deliver_webhook(settings: Settings, job_id: str, url: str, body: bytes) -> None:
    """POST the result to `url`, retrying 5xx and connection errors. The SSRF policy for
    webhooks is checked on every address connected to, and redirects are not followed:
    a 3xx would send the signed result somewhere the job's URL did not name."""
    secret = settings.webhook_secret.get_secret_value()
    timeout = aiohttp.ClientTimeout(total=10)
    async with SafeHttp(webhook_policy(settings), timeout=timeout, follow_redirects=False) as http:
        for attempt in range(WEBHOOK_ATTEMPTS):
            headers = {"Content-Type": "application/json"}
            if secret:
                ts = str(int(time.time()))
                headers[WEBHOOK_TIMESTAMP_HEADER] = ts
                headers[WEBHOOK_SIGNATURE_HEADER] = sign_webhook(secret, ts, body)
            try:
                async with await http.request("POST", url, data=body, headers=headers) as resp:
                    if 300 <= resp.status < 400:
                        log.warning(
                            "webhook for job %s answered %d; redirects are not followed",
                            job_id,
                            resp.status,
                        )
                        return
                    if resp.status < 500:
                        return
            except InvalidJob as e:
                log.warning("webhook for job %s not sent: %s", job_id, e.message)
                return
            except (TimeoutError, aiohttp.ClientError):
                pass
            await asyncio.sleep(backoff_delay(attempt))
    log.warning("webhook for job %s not delivered after %d attempts", job_id, WEBHOOK_ATTEMPTS)
