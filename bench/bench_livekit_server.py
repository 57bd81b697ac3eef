"""Benchmark the dev LiveKit server with real SDK clients.

    infra/netns-run .venv/bin/python bench/bench_livekit_server.py [--quick] [--json]

Starts the server as a subprocess, then measures from SDK clients in this process:
connect time per participant, byte-stream throughput between two participants, RPC round
trip, and how many participants (2 per room) one server process holds, with its CPU% and
RSS. Every phase is bounded in count and time; the capacity phase stops at the first
failed join and reports what it reached.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Any

import psutil
from jwt.warnings import InsecureKeyLengthWarning
from livekit import api, rtc

from avatarq_dev.bench.stats import pct
from avatarq_dev.processes import python_module

API_KEY, API_SECRET = "devkey", "secret"
STREAM_TOPIC = "lk.audio_stream"
CHUNK = 64 * 1024
JOIN_TIMEOUT = 30.0
CPU_SAMPLE_SECONDS = 5.0


@dataclass(frozen=True)
class Plan:
    connects: int
    stream_bytes: int
    rpcs: int
    rooms: int
    join_batch: int
    capacity_deadline: float


FULL = Plan(
    connects=20, stream_bytes=8_000_000, rpcs=200, rooms=100, join_batch=10, capacity_deadline=300.0
)
QUICK = Plan(
    connects=6, stream_bytes=2_000_000, rpcs=50, rooms=10, join_batch=5, capacity_deadline=60.0
)


def token(identity: str, room: str) -> str:
    grants = api.VideoGrants(room_join=True, room=room)
    return api.AccessToken(API_KEY, API_SECRET).with_identity(identity).with_grants(grants).to_jwt()


async def join(url: str, identity: str, room: str) -> tuple[rtc.Room, float]:
    r = rtc.Room()
    start = time.perf_counter()
    await asyncio.wait_for(r.connect(url, token(identity, room)), JOIN_TIMEOUT)
    return r, time.perf_counter() - start


async def bench_connect(url: str, n: int) -> dict[str, float]:
    times = []
    for i in range(n):
        room, elapsed = await join(url, f"c{i}", "bench-connect")
        times.append(elapsed * 1000)
        await room.disconnect()
    return {"connect_ms_p50": statistics.median(times), "connect_ms_p95": pct(times, 0.95)}


async def bench_stream_and_rpc(url: str, size: int, rpcs: int) -> dict[str, float]:
    a, _ = await join(url, "sender", "bench-data")
    b, _ = await join(url, "receiver", "bench-data")
    try:
        done: asyncio.Future[int] = asyncio.get_running_loop().create_future()

        async def read(reader: rtc.ByteStreamReader) -> None:
            total = 0
            async for chunk in reader:
                total += len(chunk)
            done.set_result(total)

        tasks: set[asyncio.Task[None]] = set()
        b.register_byte_stream_handler(
            STREAM_TOPIC, lambda reader, _sender: tasks.add(asyncio.ensure_future(read(reader)))
        )
        payload = os.urandom(size)
        start = time.perf_counter()
        writer = await a.local_participant.stream_bytes(
            "bench", topic=STREAM_TOPIC, destination_identities=["receiver"], total_size=size
        )
        for i in range(0, size, CHUNK):
            await writer.write(payload[i : i + CHUNK])
        await writer.aclose()
        received = await asyncio.wait_for(done, 120)
        elapsed = time.perf_counter() - start
        assert received == size, (received, size)

        b.local_participant.register_rpc_method("echo", lambda data: data.payload)
        rtts = []
        for i in range(rpcs):
            t0 = time.perf_counter()
            reply = await a.local_participant.perform_rpc(
                destination_identity="receiver", method="echo", payload=str(i)
            )
            rtts.append((time.perf_counter() - t0) * 1000)
            assert reply == str(i)
        return {
            "stream_mb": size / 1e6,
            "stream_mb_per_s": size / 1e6 / elapsed,
            "rpc_ms_p50": statistics.median(rtts),
            "rpc_ms_p95": pct(rtts, 0.95),
        }
    finally:
        await a.disconnect()
        await b.disconnect()


async def bench_capacity(url: str, server: psutil.Process, plan: Plan) -> dict[str, float]:
    rooms: list[rtc.Room] = []
    deadline = time.monotonic() + plan.capacity_deadline
    failed = ""
    try:
        specs = [(f"p{i}-{k}", f"bench-cap-{i}") for i in range(plan.rooms) for k in range(2)]
        for start in range(0, len(specs), plan.join_batch):
            if time.monotonic() > deadline:
                failed = "deadline"
                break
            batch = specs[start : start + plan.join_batch]
            results = await asyncio.gather(
                *(join(url, ident, room) for ident, room in batch), return_exceptions=True
            )
            for res in results:
                if isinstance(res, BaseException):
                    failed = failed or repr(res)
                else:
                    rooms.append(res[0])
            if failed:
                break
        server.cpu_percent(None)
        await asyncio.sleep(CPU_SAMPLE_SECONDS)
        cpu = server.cpu_percent(None)
        rss_mb = server.memory_info().rss / 1e6
        held = sum(1 for r in rooms if r.isconnected())
        return {
            "participants_target": plan.rooms * 2,
            "participants_held": held,
            "server_cpu_percent_idle_held": cpu,
            "server_rss_mb": rss_mb,
            "server_rss_mb_per_participant": rss_mb / max(held, 1),
            "capacity_stopped_by": failed or "",
        }
    finally:
        await asyncio.gather(*(r.disconnect() for r in rooms), return_exceptions=True)


async def run(plan: Plan, url: str, server: psutil.Process) -> dict[str, Any]:
    results: dict[str, Any] = {"server_rss_mb_start": server.memory_info().rss / 1e6}
    results.update(await bench_connect(url, plan.connects))
    results.update(await bench_stream_and_rpc(url, plan.stream_bytes, plan.rpcs))
    results.update(await bench_capacity(url, server, plan))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller counts (about a minute)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    if os.environ.get("AVATARQ_IN_NETNS") != "1":
        print("run inside infra/netns-run (libwebrtc ignores loopback)", file=sys.stderr)
        return 2
    warnings.filterwarnings("ignore", category=InsecureKeyLengthWarning)
    plan = QUICK if args.quick else FULL
    proc = python_module(
        "livekit-server",
        "avatarq_dev.livekit_server",
        lambda ports: (
            ["--port", str(ports[0]), "--keys", f"{API_KEY}: {API_SECRET}"]
            + ["--log-level", "WARNING"]
        ),
        ports=["tcp"],
    )
    with proc:
        assert proc.proc is not None
        server = psutil.Process(proc.proc.pid)
        url = f"ws://127.0.0.1:{proc.port}"
        results = asyncio.run(asyncio.wait_for(run(plan, url, server), 900))
    results["plan"] = "quick" if args.quick else "full"
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for key, value in results.items():
            shown = f"{value:.1f}" if isinstance(value, float) else str(value)
            print(f"{key:36} {shown}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
