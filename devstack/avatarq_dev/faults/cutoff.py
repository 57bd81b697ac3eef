"""A worker cut off from Redis: its Redis traffic goes through a TCP relay the scenario can cut
and restore. While its job plays (split brain), the worker keeps streaming through LiveKit,
its heartbeat and lease lapse, a live worker recovers the job, and the cut-off attempt, once
it reaches Redis again, must say nothing more of it. Before its job starts, for longer than
the worker waits for Redis, the job goes back to the queue rather than be lost."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import threading
import time
from collections.abc import Iterator
from typing import Any

from avatarq_dev.faults.lab import FaultLab, Run


def port_of(url: str) -> int:
    """The port of a `scheme://host:port[/db]` URL."""
    return int(url.rsplit(":", 1)[1].split("/")[0])


class RedisRelay:
    """Forwards loopback TCP connections to Redis; `cut()` drops every connection and
    refuses new ones until `restore()`; `go_silent()` leaves the open ones open but carries
    nothing more on them."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.open = True
        #: Connections accepted before this many `go_silent()` calls carry nothing.
        self._silenced = 0
        self._accepted_in = 0
        self._loop = asyncio.new_event_loop()
        self._writers: set[asyncio.StreamWriter] = set()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(asyncio.start_server(self._accept, "127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.open:
            writer.close()
            return
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self._writers |= {writer, up_writer}
        accepted_in = self._accepted_in

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, asyncio.IncompleteReadError):
                while data := await src.read(65536):
                    if accepted_in < self._silenced:
                        continue  # read, so nothing backs up to tell the sender
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self._writers -= {writer, up_writer}

    def _drop_all(self) -> None:
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    def cut(self) -> None:
        """Refuse new connections and drop the open ones; returns once they are dropped (a
        message sent after it cannot reach the cut-off side through a connection not yet
        dropped)."""
        self.open = False
        dropped = threading.Event()

        def drop() -> None:
            self._drop_all()
            dropped.set()

        self._loop.call_soon_threadsafe(drop)
        dropped.wait(5.0)

    def go_silent(self) -> None:
        """The open connections go silent, neither answered nor closed: the address they
        reached died without a word (a failover to another host, a route gone). Only TCP's
        own retries would end them, after about 15 minutes. New connections are carried."""
        self._silenced = self._accepted_in = self._accepted_in + 1

    def route(self, url: str) -> str:
        """`url` (of the relay's target) through the relay."""
        return url.replace(f":{port_of(url)}", f":{self.port}")

    def restore(self) -> None:
        self.open = True

    @contextlib.contextmanager
    def running(self) -> Iterator[RedisRelay]:
        self._thread.start()
        self._ready.wait(10)
        try:
            yield self
        finally:
            self._loop.call_soon_threadsafe(self._drop_all)
            self._loop.call_soon_threadsafe(self._loop.stop)


@contextlib.contextmanager
def _one_worker_through_relay(lab: FaultLab) -> Iterator[tuple[RedisRelay, Any]]:
    """One worker whose Redis (results, ledger and, on the Redis broker, its broker) goes
    through a relay."""
    url = lab.stack.redis.url
    with RedisRelay(port_of(url)).running() as relay:
        via = relay.route(url)
        extra = {"REDIS_URL": via}
        if lab.broker == "redis":
            extra["CELERY_BROKER_URL"] = via
        with lab.workers(1, concurrency=1, env=extra) as (worker,):
            yield relay, worker


def worker_cut_off_from_redis(lab: FaultLab, cut_for_s: float = 25.0) -> Run:
    """Cut the playing worker off Redis (results, ledger and, on the Redis broker, its broker)
    3 s into a 20 s job for `cut_for_s`, longer than its heartbeat and lease; a live worker
    takes the job over. Reconnected, the old worker writes no event and sends no message."""
    room = f"cutoff-{secrets.token_hex(3)}"
    with _one_worker_through_relay(lab) as (relay, victim):
        job = lab.enqueue(room, 20.0)
        lab.wait_streamed(job, 3.0)
        with lab.workers(1):
            cut_at = time.time()
            relay.cut()
            taken_over = lab.started_attempt(job, 2, timeout=60)
            time.sleep(max(0.0, cut_at + cut_for_s - time.time()))
            relay.restore()
            restored_at = time.time()
            records = lab.wait([job])
            time.sleep(5.0)  # what the old attempt would say, it says soon after
            victim_log = victim.tail(4000)
    run = lab.observe(
        "worker cut off from Redis mid-stream",
        [job],
        records,
        recover_s=taken_over - cut_at,
        room=room,
        cut_at=cut_at,
        taken_over_at=taken_over,
        restored_at=restored_at,
        victim_retried=f"avatarq.render[{job}] retry" in victim_log,
    )
    return run


#: How long a cut-off worker may take to give up on Redis (tasks/backoff.py RedisPatience: up
#: to about 90 s), with room to spare.
PATIENCE_OUT_S = 150.0


def worker_cut_off_from_redis_past_its_patience(lab: FaultLab) -> Run:
    """Cut the only worker off Redis (ledger and results; the broker is RabbitMQ) before its
    job arrives, until it gives up waiting; then restore. Failing the job would let Celery
    acknowledge its message, and lose it: it must come back through the broker and play."""
    room = f"patience-{secrets.token_hex(3)}"
    with _one_worker_through_relay(lab) as (relay, worker):
        relay.cut()
        cut_at = time.time()
        job = lab.enqueue(room, 1.0)
        deadline = time.monotonic() + PATIENCE_OUT_S
        while "sending it back to the queue" not in worker.tail(4000):
            if time.monotonic() > deadline:
                break
            time.sleep(1.0)
        gave_up_at = time.time()
        relay.restore()
        records = lab.wait([job], timeout=90.0)
    return lab.observe(
        "worker cut off from Redis past its patience, before its job started",
        [job],
        records,
        room=room,
        cut_at=cut_at,
        gave_up_after_s=gave_up_at - cut_at,
    )


#: A job that plays on after its Redis went silent ends within this (its own 12 s, the
#: worker's Redis timeouts, and room to spare); TCP alone would take about 15 minutes.
SILENT_REDIS_JOB_S = 60.0
#: How long the worker idles before its Redis goes silent the second time.
IDLE_S = 3.0


def redis_goes_silent_under_the_only_worker(lab: FaultLab) -> Run:
    """The only worker's Redis connections go silent twice: 3 s into a 12 s job, then while
    the worker idles, before the room's next job is sent. Nothing answers them and nothing
    closes them, while new connections reach Redis (a failover to another host). The playing
    job must play on, and the next one start, within seconds."""
    room = f"silent-{secrets.token_hex(3)}"
    with _one_worker_through_relay(lab) as (relay, _):
        playing = lab.enqueue(room, 12.0)
        lab.wait_streamed(playing, 3.0)
        silent_at = time.time()
        relay.go_silent()
        records = lab.wait([playing], timeout=SILENT_REDIS_JOB_S)
        time.sleep(IDLE_S)
        idle_silent_at = time.time()
        relay.go_silent()
        following = lab.enqueue(room, 2.0)
        records |= lab.wait([following], timeout=SILENT_REDIS_JOB_S)
    return lab.observe(
        "Redis gone silent under the only worker, playing then idle",
        [playing, following],
        records,
        room=room,
        silent_at=silent_at,
        idle_silent_at=idle_silent_at,
    )
