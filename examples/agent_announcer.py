"""An announcer agent with an avatar, in the shape of Avaluma's livekit-agents examples,
running offline: its speech comes from espeak-ng (no STT, LLM or hosted TTS). A batch job
enqueued for its room meanwhile plays through its avatar between its announcements.

    python examples/agent_announcer.py dev    a livekit-agents worker on your deployment
    make example-agent                         once on the local stack (the avatar emulator)
"""

from __future__ import annotations

import asyncio
import io
import os
import sys
import time
import uuid
import wave
from collections.abc import AsyncIterator

from livekit import api, rtc
from livekit.agents import Agent, AgentSession, JobContext, WorkerOptions, cli
from livekit.agents.voice.room_io import RoomOptions

from avatarq.settings import get_settings
from avatarq_agents import AvatarSession
from producers import enqueue, get_status
from producers.client import is_terminal
from producers.tts.espeak import EspeakEngine

AVATAR_ID = os.getenv("AVATAR_ID", "anna")
ANNOUNCEMENTS = [
    "Good morning. The library opens at nine.",
    "The cafeteria serves lunch from noon until two.",
]
#: Enqueued by any producer for the agent's room: it plays after the agent's current speech.
BULLETIN = "A message from the front desk: the shuttle leaves in five minutes."
FRAME_S = 0.02


class Announcer(Agent):
    def __init__(self) -> None:
        super().__init__(instructions="You read the day's announcements.")


async def spoken(text: str) -> AsyncIterator[rtc.AudioFrame]:
    """espeak-ng's speech as frames at its own rate (22.05 kHz): the avatar's output resamples."""
    engine = EspeakEngine(get_settings())
    speech = await asyncio.to_thread(engine.synthesize, text, None, None, False)
    with wave.open(io.BytesIO(speech.audio)) as wav:
        rate, channels = wav.getframerate(), wav.getnchannels()
        per_frame = int(rate * FRAME_S)
        while pcm := wav.readframes(per_frame):
            yield rtc.AudioFrame(pcm, rate, channels, len(pcm) // (2 * channels))


async def announce(session: AgentSession, room: str | None = None) -> str | None:
    """The agent's announcements; with `room`, a batch job is enqueued for the room as the
    first begins, as a producer elsewhere might: returns its id."""
    job_id = None
    for text in ANNOUNCEMENTS:
        speech = session.say(text, audio=spoken(text))
        if room is not None and job_id is None:
            job = {
                "room": room,
                "avatar_id": AVATAR_ID,
                "source": {"type": "tts", "text": BULLETIN},
            }
            job_id = (await asyncio.to_thread(enqueue, job)).job_id
        await speech
    return job_id


async def entrypoint(ctx: JobContext) -> None:
    session: AgentSession = AgentSession()
    avatar = AvatarSession(avatar_id=AVATAR_ID)  # the default avatar server from settings
    # Waits for a session slot of the fleet's quota, then for the avatar to render and listen.
    await avatar.start(session, room=ctx.room)
    await session.start(
        agent=Announcer(), room=ctx.room, room_options=RoomOptions(audio_output=False)
    )
    await announce(session)
    # aclose() runs at the job's shutdown: it stops the avatar and gives its slot back.


async def once_in_a_room(livekit_url: str, api_key: str, api_secret: str) -> tuple[str, str]:
    """What the worker does for one job, on a room joined directly (no agent dispatch), and a
    batch job for the room meanwhile; returns the room and the job's id once it ended."""
    room_name = f"announcer-{uuid.uuid4().hex[:6]}"
    token = (
        api.AccessToken(api_key, api_secret)
        .with_identity("announcer")
        .with_kind("agent")
        .with_grants(api.VideoGrants(room_join=True, room=room_name))
        .to_jwt()
    )
    room = rtc.Room()
    await room.connect(livekit_url, token)
    session: AgentSession = AgentSession()
    avatar = AvatarSession(avatar_id=AVATAR_ID)
    try:
        await avatar.start(session, room=room)
        await session.start(
            agent=Announcer(), room=room, room_options=RoomOptions(audio_output=False)
        )
        job_id = await announce(session, room_name)
        assert job_id is not None
        await asyncio.to_thread(wait_for_end, job_id)
    finally:
        await session.aclose()
        await avatar.aclose()
        await room.disconnect()
    return room_name, job_id


def wait_for_end(job_id: str, timeout_s: float = 60.0) -> None:
    for _ in range(int(timeout_s / 0.2)):
        if is_terminal(get_status(job_id)):
            return
        time.sleep(0.2)
    raise TimeoutError(f"job {job_id} did not end in {timeout_s:g}s")


def on_the_local_stack() -> None:
    import requests

    from avatarq_dev.stack import DEV_API_KEY, local_stack

    # One batch worker: it parks the room's job for the agent, which plays it.
    with local_stack(workers=1, concurrency=2) as stack, stack.current():
        room, job_id = asyncio.run(once_in_a_room(stack.livekit_url, DEV_API_KEY, stack.api_secret))
        result = get_status(job_id)
        print(
            f"batch job {job_id}: {result['status']}, played by agent {result.get('agent')} "
            f"in avatar session {result.get('avatar_session_id')}"
        )
        found = requests.get(f"{stack.avatar_url}/v1/sessions", params={"room": room}, timeout=5)
        for session in found.json():
            for segment in session["segments"]:
                print(
                    f"avatar {session['avatar_participant_identity']} played "
                    f"{segment['playback_position']:.2f}s of {segment['received_s']:.2f}s "
                    f"at {segment['sample_rate']} Hz (interrupted: {segment['interrupted']})"
                )
            print(f"recording: {session['wav_path']}")


if __name__ == "__main__":
    if sys.argv[1:] == ["local"]:
        on_the_local_stack()
    else:
        cli.run_app(WorkerOptions(entrypoint_fnc=entrypoint))
