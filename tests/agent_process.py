"""A conversational agent in a process of its own, for the tests that kill it:
`python -m tests.agent_process ROOM` joins ROOM with the settings' LiveKit credentials,
starts its AvatarSession and AgentSession, prints "ready" and waits to be killed."""

from __future__ import annotations

import asyncio
import sys

from livekit import api, rtc
from livekit.agents import Agent, AgentSession

from avatarq.settings import get_settings
from avatarq_agents import AvatarSession

#: At most this long alive: a test that forgot it must not leave it running.
LIFETIME_S = 120.0


async def main(room_name: str) -> None:
    settings = get_settings()
    token = (
        api.AccessToken(settings.livekit_api_key, settings.livekit_api_secret.get_secret_value())
        .with_identity("agent")
        .with_kind("agent")
        .with_grants(api.VideoGrants(room_join=True, room=room_name))
        .to_jwt()
    )
    room = rtc.Room()
    await room.connect(settings.livekit_url, token)
    session: AgentSession = AgentSession()
    avatar = AvatarSession(avatar_id="anna")
    await avatar.start(session, room=room)
    await session.start(Agent(instructions="You wait."))
    print("ready", flush=True)
    await asyncio.sleep(LIFETIME_S)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
