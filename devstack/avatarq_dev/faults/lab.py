"""The fault lab: a local stack to break, and what it observed of each scenario.

It starts the stack, enqueues jobs, injects faults and waits on conditions, each bounded in
time; a scenario leaves a `Run` (terminal records, events, the segments the avatar recorded,
measurements). Whether that is right is for `judge.py` and tests/test_faults.py to decide."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import subprocess
import time
import wave
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import redis
import requests

from avatarq.ledger.keys import (
    DEAD_LETTER_KEY,
    job_avatar_key,
    job_events_key,
    room_lane_key,
)
from avatarq.settings import get_settings
from avatarq_dev.processes import ManagedProcess, python_module
from avatarq_dev.stack import LocalStack, local_stack
from tasks.toolkit import ffmpeg_binary

#: What every worker of the suite gets: moto's S3 credentials. No avatarq setting.
WORKER_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}
JOB_TIMEOUT_S = 120.0
#: Recovery from SIGKILL must beat this (issue 10's goal), kill to completion.
RECOVERY_GOAL_S = 60.0
#: Terminal events of a job (its last one says how it ended).
TERMINAL_EVENTS = ("job.completed", "job.failed", "job.cancelled")
#: How long the avatar's recordings may take to close the segments of a scenario's rooms
#: (a killed worker's avatar notices the empty room a moment later).
SETTLE_TIMEOUT_S = 5.0

T = TypeVar("T")

#: Bytes per second of the lab's clips and of what the worker sends (16 kHz mono s16le).
SOURCE_BPS = 32000
#: The recorded samples looked up in the source: 20 ms of a sweep occur in one place only.
_PROBE_BYTES = 640


def wav_pcm(path: Path) -> bytes:
    """The samples of a WAV (the lab's clips, the emulator's recordings)."""
    with wave.open(str(path), "rb") as w:
        return w.readframes(w.getnframes())


def locate(source: bytes, pcm: bytes) -> int | None:
    """The byte offset in `source` where `pcm` is, sample for sample; None if it is not
    there whole (audio lost or altered on the way)."""
    at = source.find(pcm[:_PROBE_BYTES])
    while at != -1 and at % 2:
        at = source.find(pcm[:_PROBE_BYTES], at + 1)
    if at == -1 or source[at : at + len(pcm)] != pcm:
        return None
    return at


def poll(condition: Callable[[], T | None], *, timeout: float, interval: float = 0.1) -> T | None:
    """The first truthy value of `condition()`, asked every `interval` seconds, at most
    `timeout` seconds and so at most `timeout / interval + 1` times; None if it never came."""
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / interval) + 1):
        if value := condition():
            return value
        if time.monotonic() >= deadline:
            break
        time.sleep(interval)
    return None


@dataclass(frozen=True)
class Segment:
    """One audio segment the avatar received (from its recordings)."""

    job_id: str
    room: str
    start: float
    end: float
    received_s: float
    interrupted: bool
    #: The part of the job's source (seconds) the avatar played in this segment, found by
    #: matching the recorded samples against the source's; None where it could not be.
    span: tuple[float, float] | None = None


@dataclass
class Run:
    """What one scenario did and what the lab observed; judged elsewhere."""

    #: The scenario's title in the table.
    fault: str
    #: The jobs the scenario enqueued, in enqueue order.
    ids: list[str]
    #: Terminal records of those jobs (a missing one never ended: lost).
    records: dict[str, dict[str, Any]]
    #: Each job's events, in order.
    events: dict[str, list[dict[str, Any]]]
    #: The audio the avatar received in the scenario's rooms, by start time.
    segments: list[Segment]
    #: Every avatar session's record in those rooms (the emulator's JSON sidecars).
    sessions: list[dict[str, Any]]
    #: Seconds of audio of each job.
    durations: dict[str, float]
    #: Fault to recovery (the table's column), as the scenario measured it.
    recover_s: float | None = None
    #: The scenario's own measurements (when the fault hit, what it saw meanwhile, ...).
    facts: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def ended_at(self, job_id: str) -> float | None:
        """When the job's terminal event was written."""
        ends = [e["ts"] for e in self.events.get(job_id, []) if e["event"] in TERMINAL_EVENTS]
        return float(ends[0]) if ends else None

    def status(self, job_id: str) -> str | None:
        return self.records.get(job_id, {}).get("status")


class FaultLab:
    """A local stack (persistent Redis, moto S3) plus the tools to break it and observe."""

    def __init__(self, stack: LocalStack, s3_endpoint: str, clips: Path) -> None:
        self.stack = stack
        self.broker = "rabbitmq" if stack.rabbitmq else "redis"
        self.s3_endpoint = s3_endpoint
        self.clips = clips
        self.redis: Any = redis.Redis.from_url(stack.redis.url)  # bytes replies; loose stubs
        self.durations: dict[str, float] = {}
        self.rooms: dict[str, str] = {}
        #: Each job's source clip, to compare the avatar's recordings with.
        self.sources: dict[str, Path] = {}
        #: When each completed job streamed (first to last byte): a warm avatar
        #: session plays several jobs, so its sender alone does not say whose a segment is.
        self.windows: dict[str, tuple[str, float, float]] = {}
        self._workers = 0
        #: Restarts of the avatar emulator since the last scenario was observed.
        self._revived: list[str] = []

    # -- jobs ------------------------------------------------------------------------------
    def clip(self, seconds: float) -> Path:
        """A WAV sweep of exactly `seconds` at 16 kHz mono (what the worker sends), rising
        100 Hz → 4 kHz over the clip: no two stretches of it are alike, so a recording's
        samples say which part of the clip they are."""
        path = self.clips / f"sweep-{seconds:g}.wav"
        if not path.exists():
            rise = (4000.0 - 100.0) / (2 * seconds)
            sweep = f"aevalsrc=0.5*sin(2*PI*(100*t+{rise}*t*t)):s=16000:d={seconds}"
            subprocess.run(
                [
                    ffmpeg_binary(get_settings()), "-nostdin", "-loglevel", "error", "-y",
                    "-f", "lavfi", "-i", sweep, "-ac", "1", "-c:a", "pcm_s16le", str(path),
                ],
                check=True,
                timeout=60,
            )  # fmt: skip
        return path

    def enqueue(self, room: str, seconds: float = 1.0, **job: Any) -> str:
        from producers import enqueue

        clip = self.clip(seconds)
        job.setdefault("source", str(clip))
        handle = enqueue({"room": room, "avatar_id": "fault", "lead": 0.3, **job})
        self.sources[handle.job_id] = clip
        self.durations[handle.job_id] = seconds
        self.rooms[handle.job_id] = room
        return handle.job_id

    def send_raw(self, payload: dict[str, Any], seconds: float = 1.0) -> str:
        """Send a payload as any producer could (plain `send_task`, no `enqueue`); returns the
        Celery task id."""
        from avatarq.celeryconfig import RENDER_QUEUE, RENDER_TASK
        from producers.client import celery_app

        result = celery_app().send_task(RENDER_TASK, args=[payload], queue=RENDER_QUEUE)
        self.durations[result.id] = seconds
        if isinstance(room := payload.get("room"), str):
            self.rooms[result.id] = room
        return str(result.id)

    def status(self, job_id: str) -> dict[str, Any]:
        from producers import get_status

        return get_status(job_id)

    def wait(self, ids: list[str], timeout: float = JOB_TIMEOUT_S) -> dict[str, dict[str, Any]]:
        """Terminal records of `ids`, waiting up to `timeout`; missing ones were lost."""
        from producers.client import is_terminal

        ended: dict[str, dict[str, Any]] = {}

        def all_ended() -> bool:
            for job_id in ids:
                if job_id not in ended and is_terminal(status := self.status(job_id)):
                    ended[job_id] = status
                    ts = status.get("timestamps") or {}
                    if ts.get("first_byte") and ts.get("last_byte"):
                        window = (ts["first_byte"] - 0.05, ts["last_byte"] + 0.05)
                        self.windows[job_id] = (status.get("room", ""), *window)
            return len(ended) == len(ids)

        poll(all_ended, timeout=timeout, interval=0.2)
        return ended

    def events(self, job_id: str) -> list[dict[str, Any]]:
        return [
            {"event": f[b"event"].decode(), "ts": float(f[b"ts"]), **json.loads(f[b"data"])}
            for _id, f in self.redis.xrange(job_events_key(job_id))
        ]

    def wait_event(
        self, job_id: str, event: str, *, attempt: int | None = None, timeout: float = 60.0
    ) -> float:
        """Timestamp of the job's first `event` (of `attempt`, if given)."""

        def seen() -> float | None:
            for e in self.events(job_id):
                if e["event"] == event and attempt in (None, e.get("attempt")):
                    return float(e["ts"])
            return None

        if (ts := poll(seen, timeout=timeout)) is None:
            raise TimeoutError(f"job {job_id}: no {event} (attempt {attempt}) in {timeout:g}s")
        return ts

    def started_attempt(self, job_id: str, attempt: int, timeout: float = 90.0) -> float:
        return self.wait_event(job_id, "job.started", attempt=attempt, timeout=timeout)

    def wait_streamed(self, job_id: str, seconds: float, timeout: float = 30.0) -> None:
        """Until the job has streamed `seconds` of its audio (mid-stream, for a fault)."""

        def streamed() -> bool:
            return (self.status(job_id).get("seconds_streamed") or 0.0) >= seconds

        if not poll(streamed, timeout=timeout):
            raise TimeoutError(f"job {job_id}: not {seconds:g}s streamed in {timeout:g}s")

    def wait_parked(self, ids: list[str], timeout: float = 15.0) -> None:
        """Until every job of `ids` is parked in its room's lane (its message acknowledged)."""

        def parked() -> bool:
            return all(self.redis.hexists(room_lane_key(self.rooms[j]), j) for j in ids)

        if not poll(parked, timeout=timeout):
            raise TimeoutError(f"jobs {ids} not parked in {timeout:g}s")

    def wait_avatar_started(self, job_id: str, timeout: float = 30.0) -> None:
        """Until the job's worker started its avatar session (and noted it for recovery)."""
        if not poll(lambda: self.redis.exists(job_avatar_key(job_id)), timeout=timeout):
            raise TimeoutError(f"job {job_id}: no avatar session started in {timeout:g}s")

    def dead_lettered(self, job_id: str) -> bool:
        return any(
            json.loads(raw)["job_id"] == job_id for raw in self.redis.lrange(DEAD_LETTER_KEY, 0, -1)
        )

    # -- faults ----------------------------------------------------------------------------
    def avatar_faults(self, **changes: Any) -> None:
        url = f"{self.stack.avatar_url}/_emulator/faults"
        requests.post(url, json=changes, timeout=5).raise_for_status()

    def reset_avatar(self) -> None:
        self.avatar_faults(fail_next_starts=0, join=True, leave_after_s=None)

    def revive_avatar(self, *, watch_s: float = 0.0) -> None:
        """Start the avatar emulator again if it died within `watch_s` seconds, as a
        supervisor restarts a crashed avatar server: the livekit-rtc FFI inside it can panic
        when the LiveKit server goes away (docs/faults.md). Each restart is noted in the next
        scenario's notes."""
        avatar = self.stack.avatar

        def dead() -> bool:
            return avatar.proc is not None and avatar.proc.poll() is not None

        if poll(dead, timeout=watch_s):
            code = avatar.proc.returncode if avatar.proc is not None else None
            self._revived.append(f"avatar emulator crashed (exit {code}); restarted")
            avatar.start()

    @contextlib.contextmanager
    def workers(
        self,
        count: int = 1,
        concurrency: int = 4,
        env: dict[str, str] | None = None,
        **more: str,
    ) -> Iterator[list[Any]]:
        """Start `count` fresh workers for one scenario (with settings `env` and `more`);
        stop them afterwards."""
        self.revive_avatar()  # a crash in an earlier scenario must not fail this one
        procs = []
        for _ in range(count):
            procs.append(self.start_worker(concurrency=concurrency, **(env or {}), **more))
        try:
            yield procs
        finally:
            for p in procs:
                p.stop()

    def start_worker(self, concurrency: int = 4, **env: str) -> ManagedProcess:
        self._workers += 1
        return self.stack.start_worker(
            f"f{self._workers}", concurrency=concurrency, extra_env={**self.worker_env(), **env}
        )

    def worker_env(self) -> dict[str, str]:
        return {**WORKER_ENV, "AWS_ENDPOINT_URL_S3": self.s3_endpoint}

    # -- observing -------------------------------------------------------------------------
    def sessions(self) -> list[dict[str, Any]]:
        """Every avatar session's record (the emulator's JSON sidecars)."""
        return [json.loads(p.read_text()) for p in sorted(self.stack.recordings.glob("*.json"))]

    def segments(self) -> list[Segment]:
        """Every audio segment the avatar received, from its recordings."""
        out = []
        for session in self.sessions():
            sender = session.get("sender_identity") or ""
            wav = self.stack.recordings / f"{session.get('session_id')}.wav"
            recorded = wav_pcm(wav) if wav.exists() else b""
            offset = 0
            for seg in session.get("segments", []):
                start = seg.get("first_frame_at")
                size = int(seg.get("received_samples", 0)) * 2 * int(seg.get("num_channels", 1))
                pcm = recorded[offset : offset + size] if seg.get("in_wav", True) else b""
                offset += size if seg.get("in_wav", True) else 0
                if start is None:
                    continue
                end = seg.get("playback_finished_at") or seg.get("last_frame_at") or start
                job_id = next(
                    (
                        j
                        for j, (room, a, b) in self.windows.items()
                        if room == session["room"] and a <= start <= b
                    ),
                    sender.removeprefix("avatarq-"),
                )
                out.append(
                    Segment(
                        job_id,
                        session["room"],
                        start,
                        end,
                        float(seg.get("received_s", 0.0)),
                        bool(seg.get("interrupted")),
                        self._span(
                            job_id, pcm, seg.get("playback_position"), seg.get("heard_until")
                        ),
                    )
                )
        return sorted(out, key=lambda s: s.start)

    def _span(self, job_id: str, pcm: bytes, *played: float | None) -> tuple[float, float] | None:
        """Where in the job's source the segment's samples are, up to what the room heard: the
        avatar's position when it stopped or when its connection dropped, whichever came
        first."""
        clip = self.sources.get(job_id)
        if clip is None or not pcm:
            return None
        at = locate(wav_pcm(clip), pcm)
        if at is None:
            return None
        heard = min([len(pcm) / SOURCE_BPS, *(p for p in played if p is not None)])
        return (at / SOURCE_BPS, at / SOURCE_BPS + heard)

    def settle(self, rooms: set[str]) -> None:
        """Until the avatar closed every segment it recorded in `rooms` (bounded: a segment
        cut off by a killed worker closes when its avatar notices, or never)."""

        def closed() -> bool:
            return all(
                seg.get("interrupted") is not None
                for s in self.sessions()
                if s.get("room") in rooms
                for seg in s.get("segments", [])
            )

        poll(closed, timeout=SETTLE_TIMEOUT_S, interval=0.2)

    def observe(
        self,
        fault: str,
        ids: list[str],
        records: dict[str, dict[str, Any]],
        *,
        recover_s: float | None = None,
        **facts: Any,
    ) -> Run:
        """The `Run` of a scenario that enqueued `ids` and saw them end as `records`."""
        rooms = {self.rooms[j] for j in ids if j in self.rooms}
        self.settle(rooms)
        segments = [s for s in self.segments() if s.job_id in ids or s.room in rooms]
        notes, self._revived = self._revived, []
        return Run(
            fault=fault,
            ids=ids,
            records=records,
            events={j: self.events(j) for j in ids},
            segments=segments,
            sessions=[s for s in self.sessions() if s.get("room") in rooms],
            durations={j: self.durations.get(j, 0.0) for j in ids},
            recover_s=recover_s,
            facts=facts,
            notes=notes,
        )

    def exposed(self) -> dict[str, str]:
        """Where a secret could leak, as text: each worker log, and every value avatarq and
        Celery keep in Redis (records, results, events, ledger), by key."""
        found = {
            log.name: log.read_text(errors="replace")
            for log in (self.stack.workdir / "logs").glob("worker-*.log")
        }
        for key in [
            *self.redis.scan_iter("avatarq:*"),
            *self.redis.scan_iter("celery-task-meta-*"),
        ]:
            kind = self.redis.type(key).decode()
            values: list[bytes] = []
            if kind == "string":
                values = [self.redis.get(key) or b""]
            elif kind == "list":
                values = self.redis.lrange(key, 0, -1)
            elif kind == "stream":
                values = [json.dumps({k.decode(): v.decode() for k, v in f.items()}).encode()
                          for _id, f in self.redis.xrange(key)]  # fmt: skip
            elif kind == "hash":
                values = list(self.redis.hgetall(key).values())
            found[key.decode()] = b"\n".join(values).decode(errors="replace")
        return found


@contextlib.contextmanager
def fault_lab(workdir: Path, broker: Literal["redis", "rabbitmq"] = "redis") -> Iterator[FaultLab]:
    """The stack the faults run on, with distinctive secrets so a leak can be found: Redis
    with redis-server's default persistence, and RabbitMQ as the broker if asked."""
    api_secret = "lk-secret-" + secrets.token_hex(12)
    license_key = "avaluma-license-" + secrets.token_hex(12)
    moto = python_module(
        "moto",
        "moto.server",
        lambda ports: ["-H", "127.0.0.1", "-p", str(ports[0])],
        ports=["tcp"],
        log_dir=workdir / "logs",
    )
    with (
        moto,
        local_stack(
            workdir,
            persistent=True,
            api_secret=api_secret,
            license_key=license_key,
            broker=broker,
        ) as stack,
    ):
        saved = dict(os.environ)
        os.environ.update({**stack.env(), **WORKER_ENV})
        get_settings.cache_clear()
        clips = workdir / "clips"
        clips.mkdir(exist_ok=True)
        try:
            yield FaultLab(stack, f"http://127.0.0.1:{moto.port}", clips)
        finally:
            os.environ.clear()
            os.environ.update(saved)
            get_settings.cache_clear()
