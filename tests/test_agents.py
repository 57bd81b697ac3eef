"""avatarq_agents: a real `AgentSession` speaking through avatarq's AvatarSession to the avatar
emulator on the local stack (official livekit-server where it runs), and sharing the session
quota with a real batch worker. The PCM conversion alone runs fast, without rooms."""

from __future__ import annotations

import asyncio
import json
import math
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import requests
from livekit import api, rtc
from livekit.agents import Agent, AgentSession
from livekit.agents.voice.io import PlaybackFinishedEvent

from avatarq.settings import Settings, get_settings
from avatarq_agents import AvatarSession, AvatarSlotTimeout
from avatarq_agents.output import AvatarAudioOutput, _Segment
from avatarq_agents.pcm import ToAvatarPcm
from avatarq_dev.stack import DEV_API_KEY, LocalStack, local_stack
from tasks.link.types import PlaybackFinished
from tests import audio
from tests.netns import NETNS
from tests.test_pipeline_e2e import events_of
from tests.waiting import wait_terminal

#: The TTS rate of the agent's frames: not the avatar's 16 kHz, so the output resamples.
TTS_RATE = 24000
FRAME_S = 0.02
#: A configured avatar server (the same emulator) whose quota is one session.
SOLO = "solo"


def tone_frames(seconds: float, rate: int = TTS_RATE, channels: int = 1) -> list[rtc.AudioFrame]:
    per_frame = int(rate * FRAME_S)
    t = np.arange(int(rate * seconds)) / rate
    samples = (0.3 * 32767 * np.sin(2 * math.pi * 440 * t)).astype(np.int16)
    frames = []
    for start in range(0, len(samples), per_frame):
        chunk = np.repeat(samples[start : start + per_frame], channels)
        n = len(chunk) // channels
        frames.append(rtc.AudioFrame(chunk.tobytes(), rate, channels, n))
    return frames


async def speech(seconds: float) -> AsyncIterator[rtc.AudioFrame]:
    """Like a TTS engine: faster than real time, at its own rate."""
    for frame in tone_frames(seconds):
        yield frame


# -- fast: no rooms ---------------------------------------------------------------------------


@pytest.mark.parametrize("rate,channels", [(24000, 1), (48000, 2), (16000, 1)])
def test_frames_become_16k_mono_pcm_of_the_same_length(rate: int, channels: int) -> None:
    pcm = ToAvatarPcm(16000)
    out = b"".join(pcm.push(f) for f in tone_frames(1.0, rate, channels)) + pcm.flush()
    assert abs(len(out) / 2 / 16000 - 1.0) < 0.01


def test_a_segment_coalesces_frames_and_stops_on_clear() -> None:
    async def go() -> tuple[list[int], list[int]]:
        whole = _Segment(ToAvatarPcm(16000))
        for _ in range(50):
            whole.queue.put_nowait(b"\0" * 640)  # 20 ms each
        whole.end()
        sizes = [len(c) async for c in whole.chunks(12800)]  # 0.4 s writes
        cleared = _Segment(ToAvatarPcm(16000))
        cleared.queue.put_nowait(b"\0" * 640)
        got = []
        async for chunk in cleared.chunks(12800):
            got.append(len(chunk))
            cleared.cancel()  # no end: the clear alone ends the stream
        return sizes, got

    sizes, got = asyncio.run(go())
    assert sizes == [12800, 12800, 6400] and got == [640]


def test_the_server_is_named_or_found_by_url_among_the_configured_ones() -> None:
    servers = {"eu": {"url": "http://eu.example:9000", "max_sessions": 2}}
    settings = Settings(avatar_servers=servers)
    by_name = AvatarSession(avatar_id="anna", avatar_server="eu", settings=settings)
    by_url = AvatarSession(
        avatar_id="anna", avatar_server="http://eu.example:9000/", settings=settings
    )
    assert by_name.server.name == by_url.server.name == "eu" and by_url.server.max_sessions == 2
    assert AvatarSession(avatar_id="anna", settings=settings).server.name == "default"
    # A URL nobody configured never gets the license key.
    with pytest.raises(KeyError, match="no configured avatar server"):
        AvatarSession(avatar_id="anna", avatar_server="http://elsewhere.example", settings=settings)


class ScriptedSender:
    """Stands in for avatarq's sender (not LiveKit): takes what it is given at once and
    answers each segment with the next scripted report (None: the report is lost)."""

    sample_rate, bytes_per_second, avatar_identity = 16000, 32000, "avatar-anna"

    def __init__(self, reports: list[PlaybackFinished | None]) -> None:
        self.reports = reports
        self.segments: list[int] = []
        self.gate = asyncio.Event()  # the first segment's second write waits for it

    async def send_segment(
        self, chunks: AsyncIterator[bytes], pacer: Any, *, on_progress: Any, stop: Any, name: str
    ) -> int:
        sent = 0
        async for chunk in chunks:
            if not self.segments and sent:
                await self.gate.wait()
            if stop.is_set():
                break
            sent += len(chunk)
            pacer.start()
            await on_progress(sent)
        self.segments.append(sent)
        return sent

    async def wait_playback_finished(self, timeout: float) -> PlaybackFinished | None:
        return self.reports.pop(0)


def test_the_output_reports_each_segment_in_order_and_a_clear_stops_those_pending() -> None:
    async def go() -> tuple[list[tuple[float, bool]], list[int]]:
        reports = [PlaybackFinished(0.4, True), None]
        sender = ScriptedSender(reports)
        output = AvatarAudioOutput(sender, lead=0.5, report_timeout=0.1)  # type: ignore[arg-type]
        seen: list[tuple[float, bool]] = []
        output.on(
            "playback_finished", lambda ev: seen.append((ev.playback_position, ev.interrupted))
        )
        for _ in range(2):  # the first is playing when the second is captured
            for frame in tone_frames(1.0):
                await output.capture_frame(frame)
            output.flush()
            await asyncio.sleep(0.05)
        output.clear_buffer()  # the user barged in
        sender.gate.set()
        await asyncio.wait_for(output.wait_for_playout(), 5)
        for frame in tone_frames(0.5):  # the next reply: its report never comes
            await output.capture_frame(frame)
        output.flush()
        await asyncio.wait_for(output.wait_for_playout(), 5)
        return seen, sender.segments

    seen, segments = asyncio.run(go())
    # The first: stopped on the avatar, which reported its position. The second: never sent.
    # The third: no report came, so what was sent counts as played.
    assert seen == [(0.4, True), (0.0, True), (0.5, False)]
    assert segments[0] < 32000 and segments[1] == 16000  # the first cut short


class StillPlaying(ScriptedSender):
    """All sent, the avatar still playing: it reports only once told to clear."""

    def __init__(self) -> None:
        super().__init__([])
        self.gate.set()
        self.cleared = asyncio.Event()

    async def clear_buffer(self) -> None:
        self.cleared.set()

    async def wait_playback_finished(self, timeout: float) -> PlaybackFinished | None:
        await self.cleared.wait()
        return PlaybackFinished(0.7, True)


def test_a_clear_after_the_last_write_reaches_the_avatar() -> None:
    async def go() -> Any:
        sender = StillPlaying()
        output = AvatarAudioOutput(sender, lead=0.5, report_timeout=10.0)  # type: ignore[arg-type]
        for frame in tone_frames(1.0):
            await output.capture_frame(frame)
        output.flush()
        await asyncio.sleep(0.05)  # all written: the stream is closed
        output.clear_buffer()
        return await asyncio.wait_for(output.wait_for_playout(), 3)

    finished = asyncio.run(go())
    assert (finished.playback_position, finished.interrupted) == (0.7, True)


# -- on the local stack -----------------------------------------------------------------------


def test_a_session_whose_avatar_never_joined_removes_no_one_as_it_closes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # In a job, livekit-agents' AvatarSession.aclose removes whoever has the avatar identity.
    # After a start that failed before its avatar was asked for (the room held by another
    # agent, or still playing a worker's job; no slot), that avatar is someone else's.
    from livekit.agents.voice.avatar import _types

    removed: list[str] = []

    class RoomService:
        async def remove_participant(self, request: Any) -> None:
            removed.append(request.identity)

    class JobApi:
        room = RoomService()

    class Job:
        api = JobApi()

    class Room:
        name = "held-room"

        def isconnected(self) -> bool:
            return True

        def off(self, *_: Any) -> None:
            return None

    monkeypatch.setattr(_types, "get_job_context", lambda required=False: Job())
    avatar = AvatarSession(avatar_id="anna", settings=Settings())
    avatar._room = Room()  # type: ignore[assignment]  # as the base class's start leaves it
    asyncio.run(avatar.aclose())
    assert removed == []


def test_an_agents_slot_that_cannot_be_renewed_ends_its_avatar_session(
    redis_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The agent's Redis goes away (a real TCP relay, cut): its avatar session ends before
    the slot can lapse and a worker start one over the quota, as a worker's idle one does."""
    from avatarq_dev.faults.cutoff import RedisRelay, port_of
    from tests.test_quota import shorten_slot_leases

    shorten_slot_leases(monkeypatch)

    async def go(via: str) -> bool:
        # A server of the test's own: its quota is no other test's.
        server = f"lapse-{uuid.uuid4().hex[:6]}"
        servers = {server: {"url": "http://127.0.0.1:9", "max_sessions": 1}}
        settings = Settings(REDIS_URL=via, AVATARQ_AVATAR_SERVERS=servers)
        avatar = AvatarSession(avatar_id="anna", avatar_server=server, settings=settings)
        await avatar._take_slot(f"lapse-{uuid.uuid4().hex[:6]}")
        relay.cut()
        for _ in range(60):
            if avatar._closed:
                break
            await asyncio.sleep(0.05)
        return avatar._closed

    with RedisRelay(port_of(redis_server)).running() as relay:
        assert asyncio.run(go(relay.route(redis_server)))


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    with local_stack(tmp_path_factory.mktemp("agents")) as s:
        solo = {SOLO: {"url": s.avatar_url, "max_sessions": 1}}
        env = {"AVATARQ_AVATAR_SERVERS": json.dumps(solo)}
        s.start_worker("batch", concurrency=2, extra_env=env)
        with s.current(env):
            yield s


async def join(stack: LocalStack, room: str, identity: str = "agent") -> rtc.Room:
    """The agent's own connection, as a livekit-agents job has it (`ctx.room`)."""
    token = (
        api.AccessToken(DEV_API_KEY, stack.api_secret)
        .with_identity(identity)
        .with_kind("agent")
        .with_grants(api.VideoGrants(room_join=True, room=room))
        .to_jwt()
    )
    lk_room = rtc.Room()
    await lk_room.connect(stack.livekit_url, token)
    return lk_room


class Conversation:
    """A room, its AgentSession and its AvatarSession, and the reports the session got."""

    def __init__(self, room: rtc.Room, session: AgentSession, avatar: AvatarSession) -> None:
        self.room, self.session, self.avatar = room, session, avatar
        self.reports: list[PlaybackFinishedEvent] = []
        assert avatar.audio_output is not None
        avatar.audio_output.on("playback_finished", self.reports.append)

    @classmethod
    async def start(cls, stack: LocalStack, room: str, **avatar_args: Any) -> Conversation:
        lk_room = await join(stack, room)
        session: AgentSession = AgentSession()
        avatar = AvatarSession(avatar_id="anna", **avatar_args)
        try:
            await avatar.start(session, room=lk_room)
        except BaseException:
            await lk_room.disconnect()
            raise
        await session.start(Agent(instructions="You announce."))
        return cls(lk_room, session, avatar)

    async def close(self) -> None:
        await self.session.aclose()
        await self.avatar.aclose()
        await self.room.disconnect()


def sessions(stack: LocalStack, room: str) -> list[dict[str, Any]]:
    answer = requests.get(f"{stack.avatar_url}/v1/sessions", params={"room": room}, timeout=5)
    return list(answer.json())


@pytest.mark.usefixtures("stack")
class TestOnTheStack:
    pytestmark = NETNS

    def test_speech_reaches_the_avatar_at_16k_and_is_confirmed(self, stack: LocalStack) -> None:
        room = f"ag-{uuid.uuid4().hex[:6]}"

        async def go() -> Conversation:
            agent = await Conversation.start(stack, room)
            try:
                for seconds in (1.5, 1.0):
                    await agent.session.say("Hello.", audio=speech(seconds))
            finally:
                await agent.close()
            return agent

        agent = asyncio.run(go())
        assert [r.interrupted for r in agent.reports] == [False, False]
        assert [round(r.playback_position, 1) for r in agent.reports] == [1.5, 1.0]
        (played,) = sessions(stack, room)
        assert [s["sample_rate"] for s in played["segments"]] == [16000, 16000]
        assert [round(s["received_s"], 2) for s in played["segments"]] == [1.5, 1.0]
        assert [s["interrupted"] for s in played["segments"]] == [False, False]
        assert {"speaking", "listening"} <= set(played["agent_states"])
        assert played["state"] == "stopped"  # aclose stopped the avatar's session

    def test_an_interruption_clears_the_avatars_buffer(self, stack: LocalStack) -> None:
        room = f"ag-{uuid.uuid4().hex[:6]}"

        async def go() -> Conversation:
            agent = await Conversation.start(stack, room)
            try:
                handle = agent.session.say("A long one.", audio=speech(8.0))
                await asyncio.sleep(2.0)
                handle.interrupt()
                await asyncio.wait_for(asyncio.shield(handle.wait_for_playout()), 10)
                await agent.session.say("After.", audio=speech(0.6))
            finally:
                await agent.close()
            return agent

        agent = asyncio.run(go())
        first, after = agent.reports
        assert first.interrupted and 0.5 < first.playback_position < 3.5
        assert not after.interrupted and round(after.playback_position, 1) == 0.6
        cut, played = sessions(stack, room)[0]["segments"]
        assert cut["interrupted"] is True
        # Paced: the avatar never held the 8 s, only what was due by the clear (plus the lead).
        assert cut["received_s"] < first.playback_position + 1.5
        assert played["interrupted"] is False and round(played["received_s"], 1) == 0.6

    def test_an_interruption_after_the_last_write_still_stops_the_avatar(
        self, stack: LocalStack
    ) -> None:
        room = f"ag-{uuid.uuid4().hex[:6]}"
        # A 2 s lead: the 4 s reply is all written by about 2 s in, still playing until 4 s.
        settings = get_settings().model_copy(update={"default_lead_s": 2.0})

        async def go() -> Conversation:
            agent = await Conversation.start(stack, room, settings=settings)
            try:
                handle = agent.session.say("Almost done.", audio=speech(4.0))
                await asyncio.sleep(3.0)
                handle.interrupt()
                await asyncio.wait_for(asyncio.shield(handle.wait_for_playout()), 10)
            finally:
                await agent.close()
            return agent

        agent = asyncio.run(go())
        (report,) = agent.reports
        assert report.interrupted and 2.0 < report.playback_position < 3.8
        (cut,) = sessions(stack, room)[0]["segments"]
        assert cut["interrupted"] is True and round(cut["received_s"], 1) == 4.0

    def test_two_rooms_with_one_avatar_id_keep_their_reports_apart(self, stack: LocalStack) -> None:
        rooms = [f"ag-{uuid.uuid4().hex[:6]}" for _ in range(2)]
        lengths = [1.0, 2.6]

        async def go() -> list[Conversation]:
            # Same agent identity, same avatar identity, one process: only the room differs.
            agents = await asyncio.gather(*(Conversation.start(stack, room) for room in rooms))
            try:
                await asyncio.gather(
                    *(
                        agent.session.say("Hi.", audio=speech(seconds))
                        for agent, seconds in zip(agents, lengths, strict=True)
                    )
                )
            finally:
                await asyncio.gather(*(agent.close() for agent in agents))
            return list(agents)

        agents = asyncio.run(go())
        for agent, room, seconds in zip(agents, rooms, lengths, strict=True):
            (report,) = agent.reports
            assert not report.interrupted and round(report.playback_position, 1) == seconds
            (played,) = sessions(stack, room)
            assert played["avatar_participant_identity"] == "avatar-anna"
            assert [round(s["received_s"], 1) for s in played["segments"]] == [seconds]

    def test_a_conversation_holds_a_quota_slot_shared_with_batch_jobs(
        self, stack: LocalStack, tmp_path: Any
    ) -> None:
        from producers import enqueue, get_status

        clip = str(audio.tone(tmp_path / "t.wav", seconds=1.0))
        batch_room = f"bj-{uuid.uuid4().hex[:6]}"

        async def go() -> tuple[str, list[str], float]:
            room = f"ag-{uuid.uuid4().hex[:6]}"
            agent = await Conversation.start(stack, room, avatar_server=SOLO)
            try:
                job = enqueue(
                    {"room": batch_room, "avatar_id": "anna", "avatar_server": SOLO, "source": clip}
                )
                seen = []
                for _ in range(40):  # 4 s: long enough for the worker to have tried
                    seen.append(str(get_status(job.job_id).get("status")))
                    await asyncio.sleep(0.1)
                # A second conversation finds no slot either, and says so in time.
                with pytest.raises(AvatarSlotTimeout, match="'solo'"):
                    await Conversation.start(
                        stack, f"ag-{uuid.uuid4().hex[:6]}", avatar_server=SOLO, slot_timeout=1.0
                    )
            finally:
                await agent.close()
            return job.job_id, seen, time.time()

        job_id, seen, closed_at = asyncio.run(go())
        # Taken by a worker ("playing"), then in line for the server's one session until the end.
        assert seen[-1] == "waiting_for_avatar" and "completed" not in seen, seen
        ended = wait_terminal(job_id, timeout=60)[job_id]
        assert ended["status"] == "completed", ended
        assert ended["timestamps"]["first_byte"] >= closed_at - 0.5
        assert get_settings().avatar_server(SOLO).max_sessions == 1

    def test_a_batch_job_for_the_agents_room_plays_through_it_after_its_speech(
        self, stack: LocalStack, tmp_path: Any
    ) -> None:
        played = self._announce(stack, tmp_path, interrupt=False)
        spoken, job = played.segments[:2]
        # The reply played whole before the job's first frame.
        assert not spoken["interrupted"] and round(spoken["received_s"], 1) == 4.0
        assert spoken["playback_finished_at"] <= job["first_frame_at"]
        assert played.reports[0].playback_position == pytest.approx(4.0, abs=0.05)

    def test_a_job_that_interrupts_cuts_the_agents_speech_short(
        self, stack: LocalStack, tmp_path: Any
    ) -> None:
        played = self._announce(stack, tmp_path, interrupt=True)
        spoken, job = played.segments[:2]
        assert spoken["interrupted"] and spoken["received_s"] < 3.0
        assert spoken["playback_finished_at"] <= job["first_frame_at"]
        assert played.reports[0].interrupted

    def _announce(self, stack: LocalStack, tmp_path: Any, *, interrupt: bool) -> Announced:
        """The agent starts a 4 s reply; 1 s in, two jobs (1.5 s, then 0.7 s) are enqueued for
        its room, the first with `interrupt`; once both ended, the agent replies again. Checks
        what holds either way (one avatar, in order, one voice at a time), returns the rest."""
        from producers import enqueue

        lengths = (1.5, 0.7)
        clips = [
            str(audio.tone(tmp_path / f"news{i}.wav", seconds=s)) for i, s in enumerate(lengths)
        ]
        room = f"an-{uuid.uuid4().hex[:6]}"

        async def go() -> tuple[Conversation, list[dict[str, Any]], str | None]:
            agent = await Conversation.start(stack, room)
            try:
                reply = agent.session.say("A long reply.", audio=speech(4.0))
                await asyncio.sleep(1.0)
                job_ids = []
                for clip, cut in zip(clips, (interrupt, False), strict=True):
                    job = {"room": room, "avatar_id": "anna", "source": clip, "interrupt": cut}
                    job_ids.append((await asyncio.to_thread(enqueue, job)).job_id)
                await asyncio.wait_for(asyncio.shield(reply.wait_for_playout()), 15)
                tail = stack.workers[0].tail
                ended = await asyncio.to_thread(
                    wait_terminal, *job_ids, timeout=30, context=lambda: tail(40)
                )
                await agent.session.say("Back to you.", audio=speech(0.8))
            finally:
                await agent.close()
            assert agent.avatar.server_session is not None
            session_id = agent.avatar.server_session.session_id
            return agent, [ended[j] for j in job_ids], session_id

        agent, results, session_id = asyncio.run(go())
        (played,) = sessions(stack, room)  # the agent's avatar, and no other
        segments = played["segments"]
        spans = spans_of(segments)
        assert len(segments) == 4, spans
        # One voice at a time: each segment reported played before the next one's first frame.
        for earlier, later in zip(segments, segments[1:], strict=False):
            assert earlier["playback_finished_at"] <= later["first_frame_at"], spans
        # The jobs in their order, through the agent's avatar session, confirmed; their results
        # say so.
        for result, segment, seconds in zip(results, segments[1:3], lengths, strict=True):
            assert result["status"] == "completed" and result["playback_confirmed"], result
            assert result["agent"] and result["avatar_session_id"] == session_id
            assert round(segment["received_s"], 1) == seconds and not segment["interrupted"]
        assert session_id == played["session_id"]
        after = segments[3]  # the agent resumed after them
        assert round(after["received_s"], 1) == 0.8 and agent.reports[-1].interrupted is False
        assert len(agent.reports) == 2  # the jobs' segments are not the session's speech
        events = [e["event"] for e in events_of(stack, results[0]["job_id"])]
        assert events[:2] == ["job.started", "job.avatar_ready"] and events[-1] == "job.completed"
        return Announced(segments, agent.reports)

    def test_an_agent_speaks_after_the_rooms_playing_job_and_leaves_its_jobs_to_the_workers(
        self, stack: LocalStack, tmp_path: Any
    ) -> None:
        from producers import enqueue, get_status

        first = str(audio.tone(tmp_path / "first.wav", seconds=2.5))
        later = str(audio.tone(tmp_path / "later.wav", seconds=1.0))
        room = f"an-{uuid.uuid4().hex[:6]}"

        async def go() -> tuple[str, str]:
            job = {"room": room, "avatar_id": "anna", "source": first}
            before = await asyncio.to_thread(enqueue, job)
            for _ in range(200):  # a worker's avatar plays it (20 s at most)
                if (await asyncio.to_thread(get_status, before.job_id)).get("status") == "playing":
                    break
                await asyncio.sleep(0.1)
            agent = await Conversation.start(stack, room)  # waits for that job's end
            try:
                reply = agent.session.say("A long reply.", audio=speech(4.0))
                await asyncio.sleep(1.0)
                after = await asyncio.to_thread(enqueue, {**job, "source": later})
                await asyncio.sleep(1.0)
            finally:
                await agent.close()  # the job waiting for the reply goes back to the workers
            await asyncio.wait_for(asyncio.shield(reply.wait_for_playout()), 10)
            return before.job_id, after.job_id

        before, after = asyncio.run(go())
        tail = stack.workers[0].tail
        ended = wait_terminal(before, after, timeout=60, context=lambda: tail(60))
        for job_id in (before, after):
            assert ended[job_id]["status"] == "completed" and ended[job_id]["agent"] is None
        # Every segment heard in the room, whichever avatar played it: one at a time.
        heard = sorted(
            (s for played in sessions(stack, room) for s in played["segments"]
             if s["received_samples"] > 0),
            key=lambda s: s["first_frame_at"],
        )  # fmt: skip
        spans = spans_of(heard)
        for earlier, next_one in zip(heard, heard[1:], strict=False):
            assert earlier["playback_finished_at"] <= next_one["first_frame_at"], spans
        # The first job, the agent's reply (cut short as it closed), then the later job. If the
        # closing session's cut let it start on the agent's avatar, it was handed back and
        # resumed on a worker's: one more attempt, one more segment.
        attempts = len(ended[after]["attempts"])
        assert len(heard) == 2 + attempts and attempts <= 2, spans
        assert round(heard[0]["received_s"], 1) == 2.5 and heard[1]["received_s"] < 2.8
        assert round(heard[-1]["received_s"] + ended[after]["started_at"], 1) == 1.0

    def test_a_killed_agents_job_and_room_go_back_to_the_workers(
        self, stack: LocalStack, tmp_path: Any
    ) -> None:
        from producers import enqueue, get_status

        clip = str(audio.tone(tmp_path / "long.wav", seconds=6.0))
        room = f"an-{uuid.uuid4().hex[:6]}"
        argv = [sys.executable, "-m", "tests.agent_process", room]
        with subprocess.Popen(argv, stdout=subprocess.PIPE, text=True) as agent:
            try:
                assert agent.stdout is not None and agent.stdout.readline().strip() == "ready"
                job_id = enqueue({"room": room, "avatar_id": "anna", "source": clip}).job_id
                for _ in range(100):  # the agent plays it (10 s at most)
                    if get_status(job_id).get("seconds_streamed", 0) > 1.0:
                        break
                    time.sleep(0.1)
                agent.kill()
                killed_at = time.time()
            finally:
                agent.kill()
        tail = stack.workers[0].tail
        result = wait_terminal(job_id, timeout=60, context=lambda: tail(60))[job_id]
        # Its heartbeat gone, recovery sent the job back; its hold on the room lapsed, so a
        # worker's avatar played the rest, from where the agent's had got.
        assert result["status"] == "completed" and result["agent"] is None, result
        assert len(result["attempts"]) == 2 and result["started_at"] > 1.0, result
        assert result["timestamps"]["first_byte"] > killed_at
        agents_session, workers_session = sessions(stack, room)
        assert agents_session["session_id"] != result["avatar_session_id"]
        assert workers_session["session_id"] == result["avatar_session_id"]


def spans_of(segments: list[dict[str, Any]]) -> list[tuple[float, float, float]]:
    """Each recorded segment's first frame, its report and its length: a failure's context."""
    return [(s["first_frame_at"], s["playback_finished_at"], s["received_s"]) for s in segments]


@dataclass
class Announced:
    segments: list[dict[str, Any]]
    reports: list[PlaybackFinishedEvent]
