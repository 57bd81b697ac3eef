"""Caption cues as LiveKit transcription text streams, as livekit-agents publishes them.

Each cue is one `lk.transcription` text stream: opened with its text when the cue starts
(`lk.transcription_final` "false"), closed with "true" when it ends; `lk.segment_id` names the
cue, `lk.transcribed_track_id` the avatar's audio track. LiveKit's client components show
such streams as captions (docs/captions.md)."""

from __future__ import annotations

import logging

from livekit import rtc

log = logging.getLogger("avatarq.captions")

#: livekit-agents' names (livekit/agents/types.py), which LiveKit's clients read.
TOPIC_TRANSCRIPTION = "lk.transcription"
ATTRIBUTE_SEGMENT_ID = "lk.segment_id"
ATTRIBUTE_TRACK_ID = "lk.transcribed_track_id"
ATTRIBUTE_FINAL = "lk.transcription_final"


class TranscriptionOut:
    """The `Captions` of one room, on behalf of the avatar's audio (tasks/link/types.py)."""

    def __init__(self, room: rtc.Room, avatar_identity: str) -> None:
        self.room = room
        self.avatar_identity = avatar_identity
        self.playback_started_at: float | None = None
        self._open: dict[str, rtc.TextStreamWriter] = {}

    def _attributes(self, cue_id: str, final: bool) -> dict[str, str]:
        attributes = {ATTRIBUTE_FINAL: "true" if final else "false", ATTRIBUTE_SEGMENT_ID: cue_id}
        avatar = self.room.remote_participants.get(self.avatar_identity)
        audio = [
            pub.sid
            for pub in (avatar.track_publications.values() if avatar else ())
            if pub.kind == rtc.TrackKind.KIND_AUDIO
        ]
        if audio:
            attributes[ATTRIBUTE_TRACK_ID] = audio[0]
        return attributes

    async def show(self, cue_id: str, text: str) -> None:
        writer = await self.room.local_participant.stream_text(
            topic=TOPIC_TRANSCRIPTION, attributes=self._attributes(cue_id, final=False)
        )
        self._open[cue_id] = writer
        await writer.write(text)

    async def end(self, cue_id: str) -> None:
        writer = self._open.pop(cue_id, None)
        if writer is not None:
            await writer.aclose(attributes=self._attributes(cue_id, final=True))
