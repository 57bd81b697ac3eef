"""The server end of a participant's publisher peer connection (aiortc).

Only the SCTP data channels are wanted: media sections are answered `inactive`, so no RTP is
sent and no decoder grows memory, and no subscriber connection is offered
(`subscriber_primary=false`), so data goes back on the channels the participant opened."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable

from aiortc import (
    RTCConfiguration,
    RTCDataChannel,
    RTCPeerConnection,
    RTCSessionDescription,
)
from aiortc.sdp import candidate_from_sdp

log = logging.getLogger("avatarq.livekit_server.peer")

# Labels of the data channels the SDK opens on its publisher connection.
RELIABLE_LABEL = "_reliable"
LOSSY_LABEL = "_lossy"
DATA_TRACK_LABEL = "_data_track"
SDP_OFFER = "offer"
SDP_ANSWER = "answer"
INACTIVE = "inactive"
CANDIDATE_PREFIX = "candidate:"

# Messages for a channel the client has not opened yet are held (up to this many) and sent
# once it opens, so a packet sent right after a participant joins is not lost.
MAX_PENDING = 1024

DataHandler = Callable[[str, bytes], None]


class PublisherPeer:
    def __init__(self, on_data: DataHandler, on_connected: Callable[[], None]) -> None:
        # No ICE servers at all: aiortc would otherwise default to a public STUN server,
        # and every candidate we need is a host candidate in the local namespace.
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.channels: dict[str, RTCDataChannel] = {}
        self._pending: list[tuple[str, bytes]] = []
        self._on_data = on_data
        self._on_connected = on_connected
        self.pc.on("datachannel", self._add_channel)
        self.pc.on("connectionstatechange", self._state_changed)

    def _add_channel(self, channel: RTCDataChannel) -> None:
        label = channel.label
        self.channels[label] = channel

        @channel.on("message")
        def on_message(message: bytes | str) -> None:
            # The SDK only sends binary protobuf; text frames carry nothing we understand.
            if isinstance(message, bytes):
                self._on_data(label, message)

        if self._pending:
            pending, self._pending = self._pending, []
            for pending_label, payload in pending:
                self.send(pending_label, payload)

    def _state_changed(self) -> None:
        if self.pc.connectionState == "connected":
            self._on_connected()

    async def answer(self, offer_sdp: str) -> str:
        """Apply a (re)negotiation offer and return our answer SDP, candidates included."""
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=offer_sdp, type=SDP_OFFER))
        for transceiver in self.pc.getTransceivers():
            transceiver.direction = INACTIVE
        await self.pc.setLocalDescription(await self.pc.createAnswer())
        return self.pc.localDescription.sdp

    async def add_candidate(self, candidate_init: str) -> None:
        """Add a trickled candidate, given as the SDK's JSON RTCIceCandidateInit."""
        init = json.loads(candidate_init)
        line = str(init.get("candidate", ""))
        if not line:
            return  # end-of-candidates marker
        if line.startswith(CANDIDATE_PREFIX):
            line = line[len(CANDIDATE_PREFIX) :]
        candidate = candidate_from_sdp(line)
        candidate.sdpMid = init.get("sdpMid")
        candidate.sdpMLineIndex = init.get("sdpMLineIndex")
        await self.pc.addIceCandidate(candidate)

    def send(self, label: str, payload: bytes) -> bool:
        """Send on this participant's channel of that label (reliable if it has none)."""
        channel = self.channels.get(label) or self.channels.get(RELIABLE_LABEL)
        if channel is None or channel.readyState != "open":
            if len(self._pending) >= MAX_PENDING:
                return False
            self._pending.append((label, payload))
            return True
        channel.send(payload)
        return True

    async def close(self) -> None:
        await self.pc.close()
