"""The fleet under contention: many short jobs over a few rooms, a tiny session quota, forced
avatar-start failures and workers SIGKILLed at random, all at once. It interleaves claim,
park, hand-on, lease renewal, release, retry, recovery and quota waits far more often than a
normal run; a room lane's own faults (SIGTERM of its holder, cancel of a parked job); and
more rooms than worker threads, where a lane takes its room's next jobs from the ledger
ahead of their messages; a worker cut off from Redis while it keeps a session idle; a slow
webhook receiver beside a room's lane.
`tests/test_fleet.py` asserts what the listener and the quota saw."""

from __future__ import annotations

import contextlib
import json
import random
import secrets
import signal
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from avatarq.ledger.keys import (
    LANES_KEY,
    job_lease_key,
    job_record_key,
    room_lane_key,
    room_order_key,
    worker_held_key,
)
from avatarq_dev.faults.cutoff import RedisRelay, port_of
from avatarq_dev.faults.lab import FaultLab, Run


@dataclass(frozen=True)
class Load:
    rooms: int = 6
    per_room: int = 5
    clip_s: float = 1.0
    quota: int = 2
    workers: int = 3
    concurrency: int = 4
    #: Workers SIGKILLed (each replaced at once by a fresh one), at random times.
    kills: int = 2
    #: Avatar starts that fail with a 500 first (retried by the client, then by the job).
    failed_starts: int = 3
    seed: int = 7
    timeout_s: float = 240.0


def peak_sessions(sessions: list[dict[str, Any]], until: float) -> int:
    """Most avatar sessions alive at once, from the emulator's records (created → stopped)."""
    marks: list[tuple[float, int]] = []
    for s in sessions:
        start = s.get("created_at")
        if start is None:
            continue
        marks += [(float(start), 1), (float(s.get("stopped_at") or until), -1)]
    alive = peak = 0
    for _at, step in sorted(marks):  # a stop sorts before a start at the same instant
        alive += step
        peak = max(peak, alive)
    return peak


def unaccounted(lab: FaultLab, ids: list[str]) -> list[str]:
    """Jobs that did not end and that nothing will play: no live lease, not parked in a lane,
    not held by a worker process (the ledger's own audit, run once the fleet is idle)."""
    r = lab.redis
    held: set[bytes] = set()
    for key in r.scan_iter(worker_held_key("*")):
        held.update(r.hkeys(key))
    parked: set[bytes] = set()
    for room in r.smembers(LANES_KEY):
        parked.update(r.hkeys(room_lane_key(room.decode())))
    out = []
    for job_id in ids:
        lease = r.get(job_lease_key(job_id))
        live = lease is not None and not lease.startswith(b"~")
        ended = r.exists(job_record_key(job_id))
        if not ended and not live and job_id.encode() not in held | parked:
            out.append(job_id)
    return out


def whereabouts(lab: FaultLab, job_id: str) -> dict[str, Any]:
    """What the ledger knows of a job that did not end (for a failure's message)."""
    r, room = lab.redis, lab.rooms.get(job_id, "")
    held_by = [key.decode() for key in r.scan_iter(worker_held_key("*")) if r.hexists(key, job_id)]
    order = [j.decode() for j in r.lrange(room_order_key(room), 0, -1)]
    return {
        "status": lab.status(job_id).get("status"),
        "lease": (r.get(job_lease_key(job_id)) or b"").decode(),
        "parked": bool(r.hexists(room_lane_key(room), job_id)),
        "held_by": held_by,
        "place_in_room": order.index(job_id) if job_id in order else None,
        "room_head": order[0] if order else None,
    }


def stress(lab: FaultLab, load: Load = Load()) -> Run:
    """Enqueue the load room by room in turn, break things while it drains, observe."""
    rng = random.Random(load.seed)
    rooms = [f"fleet-{secrets.token_hex(3)}" for _ in range(load.rooms)]
    env = {"AVATARQ_AVATAR_MAX_SESSIONS": str(load.quota)}
    lab.avatar_faults(fail_next_starts=load.failed_starts)
    killed: list[float] = []
    with lab.workers(load.workers, concurrency=load.concurrency, env=env) as procs:
        started = time.time()
        ids = [lab.enqueue(room, load.clip_s) for _ in range(load.per_room) for room in rooms]
        ideal = max(load.per_room * load.clip_s, len(ids) * load.clip_s / load.quota)
        for at in sorted(rng.uniform(0.2, 0.8) * ideal for _ in range(load.kills)):
            time.sleep(max(0.0, started + at - time.time()))
            victim = procs.pop(rng.randrange(len(procs)))
            victim.signal(signal.SIGKILL)
            killed.append(time.time())
            procs.append(lab.start_worker(concurrency=load.concurrency, **env))
        records = lab.wait(ids, timeout=load.timeout_s)
        drained = time.time()
        stranded = unaccounted(lab, ids)
        missing = {j: whereabouts(lab, j) for j in ids if j not in records}
        left_in_rooms = {room: lab.redis.llen(room_order_key(room)) for room in rooms}
        try:
            run = lab.observe(
                "fleet under contention",
                ids,
                records,
                rooms=rooms,
                quota=load.quota,
                killed_at=killed,
                drain_s=drained - started,
                ideal_s=ideal,
                stranded=stranded,
                missing=missing,
                left_in_rooms=left_in_rooms,
            )
        finally:
            lab.reset_avatar()
    # Once the workers stopped, every session has its end recorded.
    run.sessions = [s for s in lab.sessions() if s.get("room") in set(rooms)]
    run.facts["peak_sessions"] = peak_sessions(run.sessions, until=time.time())
    return run


def sigterm_with_a_lane(lab: FaultLab) -> Run:
    """SIGTERM (grace 1 s) a worker playing a room's head with two of the room's jobs parked
    by it: the head is handed back at the end of the grace, the parked jobs at once, and
    another worker plays all three in order."""
    room = f"termlane-{secrets.token_hex(3)}"
    # Non-default grace: a hand-back needs a job longer than the grace (default 30 s).
    with lab.workers(1, concurrency=3, AVATARQ_SHUTDOWN_GRACE="1") as (victim,):
        head = lab.enqueue(room, 6.0)
        lab.wait_streamed(head, 1.0)
        behind = [lab.enqueue(room, 1.0) for _ in range(2)]
        lab.wait_parked(behind)
        with lab.workers(1):
            term_at = time.time()
            victim.signal(signal.SIGTERM)
            records = lab.wait([head, *behind])
    return lab.observe(
        "SIGTERM worker holding a lane (grace 1 s)",
        [head, *behind],
        records,
        room=room,
        term_at=term_at,
    )


def cancel_in_a_lane(lab: FaultLab) -> Run:
    """Cancel a job parked in its room's lane: it ends cancelled without playing, and the
    room's next job plays right after the head."""
    from producers import cancel

    room = f"cancellane-{secrets.token_hex(3)}"
    with lab.workers(1):
        head = lab.enqueue(room, 3.0)
        lab.wait_event(head, "job.avatar_ready")
        behind = [lab.enqueue(room, 1.0) for _ in range(2)]
        lab.wait_parked(behind)
        answer = cancel(behind[0])
        records = lab.wait([head, *behind])
    return lab.observe(
        "cancel a job parked in a lane", [head, *behind], records, room=room, answer=answer
    )


def more_rooms_than_threads(lab: FaultLab) -> Run:
    """Three rooms of three jobs, one avatar session for the fleet, one worker of two threads:
    one thread plays a room, the other holds the next room's head waiting for the session, and
    the playing room's next jobs are still in the broker behind the third room's head. The
    playing room takes them from the ledger and keeps its avatar session for them."""
    rooms = [f"threads-{secrets.token_hex(3)}" for _ in range(3)]
    # Non-default threads and quota: with the defaults (16 threads a process) the same happens
    # once a burst has more waiting rooms than threads; small numbers keep the run short.
    with lab.workers(1, concurrency=2, AVATARQ_AVATAR_MAX_SESSIONS="1"):
        ids = [lab.enqueue(room, 1.0) for _ in range(3) for room in rooms]
        records = lab.wait(ids)
    return lab.observe("more rooms than worker threads", ids, records, rooms=rooms)


def late_copy_of_a_failed_job(lab: FaultLab) -> Run:
    """A room's second job, whose file is not audio, is taken from the ledger by its room's
    lane and fails; its message comes later (one worker of two threads, the other holding a
    second room's head that waits for the only session) and finds the job ended. Its Celery
    state, which that late delivery's start set to STARTED, must be the failure again."""
    from producers.client import celery_app

    rooms = [f"late-{secrets.token_hex(3)}" for _ in range(2)]
    not_audio = lab.clips / "not-audio.wav"
    not_audio.write_bytes(b"not audio\n" * 100)
    with lab.workers(1, concurrency=2, AVATARQ_AVATAR_MAX_SESSIONS="1") as (worker,):
        # The first room plays before the second room's head comes: enqueued together, either
        # head could take the session first.
        ids = [lab.enqueue(rooms[0], 2.0)]
        lab.wait_event(ids[0], "job.avatar_ready")
        ids += [lab.enqueue(rooms[1]), lab.enqueue(rooms[0], source=str(not_audio))]
        records = lab.wait(ids)
        dropped = f"job {ids[2]}: done, not playing it"
        state = None
        deadline = time.monotonic() + 30.0
        while time.monotonic() < deadline and state != "FAILURE":
            if dropped in worker.tail(400):
                state = celery_app().AsyncResult(ids[2]).state
            time.sleep(0.2)
    return lab.observe(
        "a late copy of a failed job",
        ids,
        records,
        copy_dropped=dropped in worker.tail(400),
        celery_state=state,
    )


def idle_session_of_a_cut_off_worker(lab: FaultLab) -> Run:
    """One session slot for the fleet. A worker keeps a room's avatar session idle (warm)
    when it is cut off from Redis and its broker, so its slot is no longer renewed; a live
    worker's job in another room waits for that slot, which comes free once its lease runs
    out. The idle session must be gone by then: never two sessions at once."""
    rooms = [f"lapse-{secrets.token_hex(3)}" for _ in range(2)]
    env = lab.stack.env()
    broker = env.get("CELERY_BROKER_URL", lab.stack.redis.url)
    with contextlib.ExitStack() as cuts:
        urls = {"REDIS_URL": lab.stack.redis.url, "CELERY_BROKER_URL": broker}
        relays = {
            name: cuts.enter_context(RedisRelay(port_of(u)).running()) for name, u in urls.items()
        }
        via = {name: relays[name].route(u) for name, u in urls.items()}
        # Non-default warm idle: with the default 10 s the idle session ends by itself about
        # when its slot can lapse; kept a minute, only the slot's own watch can end it in time.
        quota = {"AVATARQ_AVATAR_MAX_SESSIONS": "1"}
        with lab.workers(1, concurrency=1, env={**via, **quota, "AVATARQ_WARM_IDLE": "60"}):
            first = lab.enqueue(rooms[0], 1.0)
            records = lab.wait([first])
            with lab.workers(1, env=quota):
                cut_at = time.time()
                for relay in relays.values():
                    relay.cut()
                # Redis may still serve the cut-off worker's blocked BRPOP (a connection it has
                # not yet seen close): a message sent at once would be lost with it, as kombu's
                # Redis transport has no ack for what BRPOP hands over. Not what is tested here.
                time.sleep(1.0)
                second = lab.enqueue(rooms[1], 1.0)
                records |= lab.wait([second], timeout=60.0)
                for relay in relays.values():
                    relay.restore()
    run = lab.observe("idle session of a worker cut off from Redis", [first, second], records,
                      rooms=rooms, cut_at=cut_at)  # fmt: skip
    run.sessions = [s for s in lab.sessions() if s.get("room") in set(rooms)]
    run.facts["peak_sessions"] = peak_sessions(run.sessions, until=time.time())
    return run


#: How long the slow webhook receiver takes to answer.
SLOW_WEBHOOK_S = 2.0


def slow_webhook_in_a_lane(lab: FaultLab) -> Run:
    """Three jobs of one room, each with a webhook to a receiver that answers after 2 s: the
    room's lane plays them back to back all the same, and the webhooks arrive in order."""
    arrived: list[str] = []  # job ids, as their webhooks were answered

    class Slow(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            time.sleep(SLOW_WEBHOOK_S)
            arrived.append(json.loads(body)["job_id"])
            self.send_response(204)
            self.end_headers()

        def log_message(self, *_: Any) -> None:
            pass

    room = f"hooks-{secrets.token_hex(3)}"
    receiver = ThreadingHTTPServer(("127.0.0.1", 0), Slow)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{receiver.server_port}/hook"
    try:
        # Non-default: the receiver is on loopback, which the webhook SSRF guard refuses.
        private = {"AVATARQ_ALLOW_PRIVATE_WEBHOOKS": "true"}
        with lab.workers(1, env=private), lab.stack.current(private):
            ids = [lab.enqueue(room, 1.0, webhook_url=url) for _ in range(3)]
            records = lab.wait(ids)
            deadline = time.monotonic() + 3 * SLOW_WEBHOOK_S + 10.0
            while len(arrived) < len(ids) and time.monotonic() < deadline:
                time.sleep(0.1)
    finally:
        receiver.shutdown()
        receiver.server_close()
    return lab.observe("a slow webhook receiver beside a lane", ids, records, room=room,
                       webhooks=arrived)  # fmt: skip
