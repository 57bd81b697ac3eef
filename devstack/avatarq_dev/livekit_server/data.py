"""DataPacket routing: stamp who sent it, then deliver it to its destinations.

Everything built on data packets (user data, chat, byte/text streams, RPC v1 and v2) passes
through untouched apart from the sender fields, which are always overwritten with the
server's view: a client can never speak for somebody else.
"""

from __future__ import annotations

import logging

from google.protobuf.message import DecodeError
from livekit.protocol import models

from .peer import LOSSY_LABEL, RELIABLE_LABEL
from .room import Participant, Room

log = logging.getLogger("avatarq.livekit_server.data")


def label_for_kind(kind: int) -> str:
    return LOSSY_LABEL if kind == models.DataPacket.Kind.LOSSY else RELIABLE_LABEL


def stamp(packet: models.DataPacket, sender: Participant | None) -> None:
    """Overwrite the sender fields; `None` means the server itself (Twirp SendData)."""
    identity = sender.identity if sender is not None else ""
    sid = sender.sid if sender is not None else ""
    packet.participant_identity = identity
    packet.participant_sid = sid
    if packet.HasField("user"):
        packet.user.participant_identity = identity
        packet.user.participant_sid = sid


def recipients(
    room: Room, packet: models.DataPacket, sender: Participant | None
) -> list[Participant]:
    destinations = set(packet.destination_identities)
    if not destinations and packet.HasField("user"):
        # Older clients addressed user packets inside the nested message.
        destinations = set(packet.user.destination_identities)
    others = [p for p in room.participants.values() if p is not sender]
    if destinations:
        return [p for p in others if p.identity in destinations]
    return others


def route(room: Room, sender: Participant | None, label: str, payload: bytes) -> int:
    """Deliver one packet; returns how many participants it was sent to."""
    packet = models.DataPacket()
    try:
        packet.ParseFromString(payload)
    except DecodeError:
        log.debug("dropping undecodable data packet from %s", sender and sender.identity)
        return 0
    if sender is not None and not sender.permission.can_publish_data:
        return 0
    stamp(packet, sender)
    out = packet.SerializeToString()
    targets = recipients(room, packet, sender)
    for target in targets:
        target.session.send_data(label, out)
    return len(targets)
