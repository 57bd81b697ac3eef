"""avatarq for livekit-agents (the `agents` extra): an `AvatarSession` for `AgentSession`
that shares the fleet's avatar servers and session quota with the batch workers, and plays
the batch jobs of its room."""

from avatarq_agents.lane import RoomHeld
from avatarq_agents.output import AvatarAudioOutput
from avatarq_agents.session import AvatarSession, AvatarSlotTimeout

__all__ = ["AvatarAudioOutput", "AvatarSession", "AvatarSlotTimeout", "RoomHeld"]
