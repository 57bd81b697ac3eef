"""Sections 6–8: the cost of sending alone, in a fresh process per configuration.

    python -m avatarq_dev.bench.sender --mode ours --streams 10 --seconds 20 [--chunk 0.2] ...

Streams the same PCM to `--streams` rooms with the worker's sender (`ours`) or livekit-agents'
(`agents`) and prints one JSON object: CPU of the streaming phase only, bytes/s, schedule errors."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import resource
import time
from collections.abc import AsyncIterator
from typing import Any

import psutil
from livekit import rtc

from avatarq.settings import get_settings
from avatarq_dev.bench.stats import spread, thread_cpu_seconds
from tasks.toolkit import (
    CHUNK_SECONDS,
    AudioStreamSender,
    HttpAvatarClient,
    Pacer,
    connect_room,
    mint_tokens,
    quiet_livekit_logs,
    token_ttl_for,
    wait_for_avatar,
)

RATE = 16000
BYTES_PER_SECOND = RATE * 2
JOIN_TIMEOUT_S = 30.0


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def tone_chunk(chunk_bytes: int) -> bytes:
    """One chunk of a 440 Hz tone; every chunk is the same (the content costs nothing)."""
    samples = chunk_bytes // 2
    pcm = (int(8000 * math.sin(2 * math.pi * 440 * i / RATE)) for i in range(samples))
    return b"".join(v.to_bytes(2, "little", signed=True) for v in pcm)


async def pcm(seconds: float, chunk_bytes: int) -> AsyncIterator[bytes]:
    chunk = tone_chunk(chunk_bytes)
    for _ in range(int(seconds * BYTES_PER_SECOND) // chunk_bytes):
        yield chunk


async def data_bytes_received(room: rtc.Room) -> int:
    """Bytes that arrived on `room`'s data channels (its RTC stats)."""
    stats = await room.get_rtc_stats()
    return sum(
        s.data_channel.dc.bytes_received
        for s in [*stats.publisher_stats, *stats.subscriber_stats]
        if s.WhichOneof("stats") == "data_channel"
    )


async def send_agents(
    room: rtc.Room, avatar: str, seconds: float, chunk_bytes: int, pacer: Pacer
) -> int:
    """The same audio through livekit-agents' DataStreamAudioOutput, paced alike."""
    from livekit.agents.voice.avatar import DataStreamAudioOutput

    out = DataStreamAudioOutput(room, destination_identity=avatar, sample_rate=RATE)
    sent = 0
    pacer.start()
    async for chunk in pcm(seconds, chunk_bytes):
        await pacer.wait(sent)
        await out.capture_frame(rtc.AudioFrame(chunk, RATE, 1, len(chunk) // 2))
        sent += len(chunk)
    out.flush()
    return sent


async def run(args: argparse.Namespace) -> dict[str, Any]:
    settings = get_settings()
    chunk_bytes = int(RATE * args.chunk) * 2
    server = settings.avatar_server(None)
    avatar_client = HttpAvatarClient(
        "default", server.base_url, settings.avatar_license_key(server)
    )
    joined: list[tuple[rtc.Room, str]] = []
    keepers: list[rtc.Room] = []
    sessions = []
    try:

        async def join(i: int) -> None:
            name, worker, avatar = f"send-{args.mode}-{i}", f"w-{i}", f"avatar-{i}"
            t = mint_tokens(
                settings,
                room=name,
                worker_identity=worker,
                avatar_identity=avatar,
                ttl=token_ttl_for(args.seconds, settings),
            )
            # As the worker joins (tasks/compat.py); DataStreamAudioOutput on the room as
            # the SDK makes it, as livekit-agents uses it.
            route = args.route_events and args.mode == "ours"
            room = await connect_room(settings.livekit_url, t.worker, route_events=route)
            joined.append((room, avatar))
            if args.keepers:
                # As a worker does in a room that existed with short timeouts.
                keeper = await connect_room(settings.livekit_url, t.keeper, route_events=route)
                keepers.append(keeper)
            sessions.append(
                await avatar_client.start(
                    livekit_url=settings.livekit_url,
                    livekit_token=t.avatar,
                    avatar_id="bench",
                    avatar_identity=avatar,
                )
            )
            await wait_for_avatar(room, avatar, timeout=JOIN_TIMEOUT_S)

        await asyncio.gather(*(join(i) for i in range(args.streams)))
        pacers = [Pacer(BYTES_PER_SECOND, lead=args.lead, record_errors=True) for _ in joined]
        write_s: list[float] = []

        async def one(i: int, room: rtc.Room, avatar: str, pacer: Pacer) -> int:
            if not args.aligned:
                # Jobs start at any moment, so their writes fall anywhere within a chunk's
                # period: spread the streams' phases the same way.
                await asyncio.sleep(args.chunk * i / len(joined))
            if args.mode == "agents":
                return await send_agents(room, avatar, args.seconds, chunk_bytes, pacer)
            sender = AudioStreamSender(room, avatar, RATE)
            # The SDK's write (FFI request, native send, completion event): from the pacer
            # letting a chunk go (after its sleep, or after the previous write when it was
            # already due) to the progress callback that follows the write.
            began = [0.0]

            async def sleep(delay: float) -> None:
                await asyncio.sleep(delay)
                began[0] = time.monotonic()

            async def wrote(_sent: int) -> None:
                now = time.monotonic()
                write_s.append(now - began[0])
                began[0] = now

            pacer.sleep = sleep
            began[0] = time.monotonic()
            return await sender.send_segment(
                pcm(args.seconds, chunk_bytes), pacer, on_progress=wrote
            )

        me = psutil.Process()
        cpu0, wall0, threads0 = cpu_seconds(), time.perf_counter(), thread_cpu_seconds(me)
        sent = await asyncio.gather(
            *(one(i, r, a, p) for i, ((r, a), p) in enumerate(zip(joined, pacers, strict=True)))
        )
        wall, cpu = time.perf_counter() - wall0, cpu_seconds() - cpu0
        threads = {
            name: round((t - threads0.get(name, 0.0)) / wall * 100, 1)
            for name, t in sorted(thread_cpu_seconds(me).items(), key=lambda kv: -kv[1])
        }
        keeper_bytes = sum([await data_bytes_received(k) for k in keepers])
    finally:
        await asyncio.gather(*(avatar_client.stop(s) for s in sessions), return_exceptions=True)
        await avatar_client.aclose()
        await asyncio.gather(*(r.disconnect() for r, _ in joined), return_exceptions=True)
        await asyncio.gather(*(r.disconnect() for r in keepers), return_exceptions=True)
    audio_s = sum(sent) / BYTES_PER_SECOND
    errors = [e * 1000 for p in pacers for e in p.errors]
    return {
        "mode": args.mode,
        "streams": args.streams,
        "chunk_s": args.chunk,
        "lead_s": args.lead,
        "audio_s": round(audio_s, 3),
        "wall_s": round(wall, 3),
        "cpu_s": round(cpu, 3),
        # CPU seconds per second of audio sent = share of one core per real-time stream.
        "cpu_percent_per_stream": round(cpu / audio_s * 100, 3),
        "bytes_per_s_per_stream": round(sum(sent) / len(sent) / wall, 1),
        "schedule_error_ms": spread(errors, 2),
        "keepers": args.keepers,
        "aligned": args.aligned,
        "write_ms": spread([w * 1000 for w in write_s], 2) if args.mode == "ours" else None,
        # What the keepers' data channels received, per byte of audio sent: the server
        # forwards the avatar's byte stream to them too.
        "keeper_bytes_per_audio_byte": round(keeper_bytes / sum(sent), 3) if keepers else None,
        "route_events": args.route_events,
        # Per thread name, % of one core while streaming: LiveKit's native threads (network,
        # tokio) next to the Python one.
        "threads_cpu_percent": threads,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=["ours", "agents"], default="ours")
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--chunk", type=float, default=CHUNK_SECONDS)
    parser.add_argument("--lead", type=float, default=0.5)
    parser.add_argument("--keepers", action="store_true", help="join a keeper per room too")
    parser.add_argument(
        "--aligned", action="store_true", help="all streams write at the same instants"
    )
    parser.add_argument(
        "--sdk-event-delivery",
        dest="route_events",
        action="store_false",
        help="every room gets every FFI event, as the SDK does (the worker routes them)",
    )
    parser.add_argument(
        "--verbose-logs", action="store_true", help="DEBUG logging like `--loglevel DEBUG`"
    )
    args = parser.parse_args(argv)
    # The worker's SDK log settings (tasks/compat.py), applied before the SDK starts, so each
    # configuration costs what it costs in a worker.
    quiet_livekit_logs()
    # Log to a file, as a worker does, so formatting costs what it costs in production.
    logging.basicConfig(
        filename=os.devnull, level=logging.DEBUG if args.verbose_logs else logging.INFO
    )
    if args.verbose_logs:
        # Undo the Python half of the worker's log settings.
        for name in ("livekit", "livekit.rtc"):
            logging.getLogger(name).setLevel(logging.DEBUG)
    result = asyncio.run(asyncio.wait_for(run(args), args.seconds * 3 + 120))
    print(json.dumps(result), flush=True)
    # Skip the SDK's atexit teardown: with log capture on, its native threads log into an
    # interpreter that is shutting down and the process aborts ("panic in a function that
    # cannot unwind"). Every room is already closed; nothing is left to flush.
    os._exit(0)


if __name__ == "__main__":
    raise SystemExit(main())
