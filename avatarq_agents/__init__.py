"""avatarq for livekit-agents (the `agents` extra): an `AvatarSession` for `AgentSession`
that shares the fleet's avatar servers and session quota with the batch workers."""

from avatarq_agents.output import AvatarAudioOutput
from avatarq_agents.session import AvatarSession, AvatarSlotTimeout

__all__ = ["AvatarAudioOutput", "AvatarSession", "AvatarSlotTimeout"]
