"""Room and participant state, and the ParticipantUpdate broadcasts that keep clients in sync.

All state lives on the server's one event loop, so nothing here takes locks.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import string
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from livekit.protocol import models, rtc

from .auth import Claims

log = logging.getLogger("avatarq.livekit_server")

ROOM_PREFIX = "RM_"
PARTICIPANT_PREFIX = "PA_"
TRACK_PREFIX = "TR_"
_ID_ALPHABET = string.ascii_letters + string.digits
_ID_LENGTH = 12

# Token `kind` claim -> ParticipantInfo.Kind (livekit.api.AccessToken.ParticipantKind).
PARTICIPANT_KINDS: dict[str, models.ParticipantInfo.Kind] = {
    "": models.ParticipantInfo.Kind.STANDARD,
    "standard": models.ParticipantInfo.Kind.STANDARD,
    "ingress": models.ParticipantInfo.Kind.INGRESS,
    "egress": models.ParticipantInfo.Kind.EGRESS,
    "sip": models.ParticipantInfo.Kind.SIP,
    "agent": models.ParticipantInfo.Kind.AGENT,
    "connector": models.ParticipantInfo.Kind.CONNECTOR,
    "bridge": models.ParticipantInfo.Kind.BRIDGE,
}
_SOURCE_NAMES: dict[str, models.TrackSource] = {
    "camera": models.TrackSource.CAMERA,
    "microphone": models.TrackSource.MICROPHONE,
    "screen_share": models.TrackSource.SCREEN_SHARE,
    "screen_share_audio": models.TrackSource.SCREEN_SHARE_AUDIO,
}


def new_id(prefix: str) -> str:
    return prefix + "".join(secrets.choice(_ID_ALPHABET) for _ in range(_ID_LENGTH))


def now_ms() -> int:
    return int(time.time() * 1000)


class Session(Protocol):
    """What a room needs from a participant's connection (implemented by signaling)."""

    def send_signal(self, response: rtc.SignalResponse) -> None: ...

    def send_data(self, label: str, payload: bytes) -> None: ...

    def close(self, leave: rtc.LeaveRequest | None) -> None: ...


@dataclass
class PublishedTrack:
    info: models.TrackInfo
    cid: str
    # m-sections of the publisher's last offer when the track was announced: a later offer
    # with more sections was made after the client added the track's transceiver.
    sections_at_publish: int
    # Set once the track appeared in a publisher offer: only then can its absence from a
    # later offer mean "unpublished" rather than "not negotiated yet".
    negotiated: bool = False


@dataclass
class Participant:
    sid: str
    identity: str
    name: str
    kind: models.ParticipantInfo.Kind
    metadata: str
    attributes: dict[str, str]
    permission: models.ParticipantPermission
    client_protocol: int
    session: Session
    joined_at_ms: int = field(default_factory=now_ms)
    state: models.ParticipantInfo.State = models.ParticipantInfo.State.JOINED
    version: int = 1
    disconnect_reason: models.DisconnectReason = models.DisconnectReason.UNKNOWN_REASON
    tracks: dict[str, PublishedTrack] = field(default_factory=dict)

    @classmethod
    def from_claims(cls, claims: Claims, session: Session, client_protocol: int) -> Participant:
        grant = claims.video
        assert grant is not None  # ensure_join() checked it
        kind = PARTICIPANT_KINDS.get(claims.kind, models.ParticipantInfo.Kind.STANDARD)
        permission = models.ParticipantPermission(
            can_subscribe=grant.can_subscribe,
            can_publish=grant.can_publish,
            can_publish_data=grant.can_publish_data,
            can_publish_sources=[
                _SOURCE_NAMES[s] for s in grant.can_publish_sources if s in _SOURCE_NAMES
            ],
            hidden=grant.hidden,
            recorder=grant.recorder,
            can_update_metadata=grant.can_update_own_metadata,
            agent=kind == models.ParticipantInfo.Kind.AGENT,
        )
        return cls(
            sid=new_id(PARTICIPANT_PREFIX),
            identity=claims.identity,
            name=claims.name,
            kind=kind,
            metadata=claims.metadata,
            attributes=dict(claims.attributes),
            permission=permission,
            client_protocol=client_protocol,
            session=session,
        )

    def bump(self) -> None:
        """Every change clients should see raises the version; the SDK drops stale updates."""
        self.version += 1

    def update_attributes(self, changes: dict[str, str]) -> None:
        # An empty value deletes the key, as on the real server.
        for key, value in changes.items():
            if value:
                self.attributes[key] = value
            else:
                self.attributes.pop(key, None)

    def info(self) -> models.ParticipantInfo:
        return models.ParticipantInfo(
            sid=self.sid,
            identity=self.identity,
            name=self.name,
            state=self.state,
            tracks=[t.info for t in self.tracks.values()],
            metadata=self.metadata,
            joined_at=self.joined_at_ms // 1000,
            joined_at_ms=self.joined_at_ms,
            version=self.version,
            permission=self.permission,
            is_publisher=bool(self.tracks),
            kind=self.kind,
            attributes=self.attributes,
            disconnect_reason=self.disconnect_reason,
            client_protocol=self.client_protocol,
        )


@dataclass
class Room:
    name: str
    empty_timeout: int
    #: Reported as livekit-server does; this server closes a room by empty_timeout alone,
    #: counting agents as participants (the official one does not).
    departure_timeout: int = 0
    max_participants: int = 0
    metadata: str = ""
    sid: str = field(default_factory=lambda: new_id(ROOM_PREFIX))
    created_at_ms: int = field(default_factory=now_ms)
    participants: dict[str, Participant] = field(default_factory=dict)  # by identity
    close_timer: asyncio.TimerHandle | None = None

    def proto(self) -> models.Room:
        return models.Room(
            sid=self.sid,
            name=self.name,
            empty_timeout=self.empty_timeout,
            departure_timeout=self.departure_timeout,
            max_participants=self.max_participants,
            creation_time=self.created_at_ms // 1000,
            creation_time_ms=self.created_at_ms,
            metadata=self.metadata,
            num_participants=len(self.participants),
            num_publishers=sum(1 for p in self.participants.values() if p.tracks),
        )

    def others(self, participant: Participant) -> list[Participant]:
        return [p for p in self.participants.values() if p is not participant]

    def broadcast(self, response: rtc.SignalResponse) -> None:
        for p in self.participants.values():
            p.session.send_signal(response)

    def broadcast_participant(self, participant: Participant) -> None:
        """Tell everyone, the participant included, about its current state."""
        update = rtc.SignalResponse(update=rtc.ParticipantUpdate(participants=[participant.info()]))
        self.broadcast(update)


class RoomRegistry:
    """All rooms of the server: created on first join or by CreateRoom, closed when empty."""

    def __init__(self, default_empty_timeout: int, default_departure_timeout: int) -> None:
        self.default_empty_timeout = default_empty_timeout
        self.default_departure_timeout = default_departure_timeout
        self.rooms: dict[str, Room] = {}
        self.on_room_closed: Callable[[Room], None] | None = None

    def get_or_create(
        self,
        name: str,
        *,
        empty_timeout: int = 0,
        departure_timeout: int = 0,
        max_participants: int = 0,
        metadata: str = "",
    ) -> Room:
        """The open room `name` as it is (what is asked for is ignored then, as by
        livekit-server's CreateRoom), else a new one."""
        room = self.rooms.get(name)
        if room is None:
            room = Room(
                name=name,
                empty_timeout=empty_timeout or self.default_empty_timeout,
                departure_timeout=departure_timeout or self.default_departure_timeout,
                max_participants=max_participants,
                metadata=metadata,
            )
            self.rooms[name] = room
            # A room nobody joins is closed after empty_timeout, like one everybody left.
            self._schedule_close(room)
        return room

    def join(self, room: Room, participant: Participant) -> Participant | None:
        """Add a participant; returns the one it replaces (same identity), already removed."""
        replaced = room.participants.get(participant.identity)
        if replaced is not None:
            self.kick(room, replaced, models.DisconnectReason.DUPLICATE_IDENTITY)
        if room.close_timer is not None:
            room.close_timer.cancel()
            room.close_timer = None
        room.participants[participant.identity] = participant
        log.info(
            "join room=%s identity=%s sid=%s kind=%s",
            room.name,
            participant.identity,
            participant.sid,
            models.ParticipantInfo.Kind.Name(participant.kind),
        )
        room.broadcast_participant(participant)
        return replaced

    def leave(self, room: Room, participant: Participant, reason: models.DisconnectReason) -> None:
        """Remove a participant (no-op if already gone) and tell the others."""
        if room.participants.get(participant.identity) is not participant:
            return
        del room.participants[participant.identity]
        participant.state = models.ParticipantInfo.State.DISCONNECTED
        participant.disconnect_reason = reason
        participant.bump()
        log.info(
            "leave room=%s identity=%s sid=%s reason=%s",
            room.name,
            participant.identity,
            participant.sid,
            models.DisconnectReason.Name(reason),
        )
        room.broadcast(
            rtc.SignalResponse(update=rtc.ParticipantUpdate(participants=[participant.info()]))
        )
        if not room.participants:
            self._schedule_close(room)

    def kick(self, room: Room, participant: Participant, reason: models.DisconnectReason) -> None:
        """Remove a participant and close its session with a LeaveRequest saying why."""
        self.leave(room, participant, reason)
        participant.session.close(
            rtc.LeaveRequest(
                can_reconnect=False, reason=reason, action=rtc.LeaveRequest.Action.DISCONNECT
            )
        )

    def delete(
        self, room: Room, reason: models.DisconnectReason = models.DisconnectReason.ROOM_DELETED
    ) -> None:
        """Close a room now, sending every participant a LeaveRequest."""
        if self.rooms.get(room.name) is not room:
            return
        del self.rooms[room.name]
        if room.close_timer is not None:
            room.close_timer.cancel()
            room.close_timer = None
        leave = rtc.LeaveRequest(
            can_reconnect=False, reason=reason, action=rtc.LeaveRequest.Action.DISCONNECT
        )
        for p in list(room.participants.values()):
            p.state = models.ParticipantInfo.State.DISCONNECTED
            p.session.close(leave)
        room.participants.clear()
        if self.on_room_closed is not None:
            self.on_room_closed(room)

    def _schedule_close(self, room: Room) -> None:
        if room.close_timer is not None:
            room.close_timer.cancel()
        room.close_timer = asyncio.get_running_loop().call_later(
            room.empty_timeout, self._close_if_empty, room
        )

    def _close_if_empty(self, room: Room) -> None:
        room.close_timer = None
        if not room.participants:
            self.delete(room, models.DisconnectReason.ROOM_CLOSED)
