"""The `/rtc` WebSocket: one binary protobuf SignalRequest/SignalResponse stream per participant.

Follows livekit/livekit pkg/service/rtcservice.go for the HTTP side (auth before upgrade,
`/rtc/validate`, `/rtc/v1` absent) and pkg/rtc for what each request does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from aiohttp import WSMsgType, web
from livekit.protocol import models, rtc

from . import data
from .auth import (
    ACCESS_TOKEN_PARAM,
    AuthError,
    Claims,
    ensure_join,
    token_from_request,
    verify_token,
)
from .config import SERVER_PROTOCOL, SERVER_VERSION, ServerConfig
from .peer import PublisherPeer
from .room import TRACK_PREFIX, Participant, PublishedTrack, Room, RoomRegistry, new_id

log = logging.getLogger("avatarq.livekit_server")

# Query parameters of the v0 signal URL (rust-sdks livekit-api signal_client get_livekit_url).
RECONNECT_PARAM = "reconnect"
PROTOCOL_PARAM = "protocol"
CLIENT_PROTOCOL_PARAM = "client_protocol"
ROOM_PARAM = "room"
TRUE_VALUES = ("1", "true")
SIGNAL_TARGET_PUBLISHER = rtc.SignalTarget.PUBLISHER
# Media directions in which the offerer sends, i.e. its track is published.
SENDING_DIRECTIONS = ("sendrecv", "sendonly")


def authenticate(request: web.Request, keys: dict[str, str]) -> Claims | None:
    token = token_from_request(
        request.headers.get("Authorization"), request.query.get(ACCESS_TOKEN_PARAM)
    )
    return verify_token(token, keys) if token else None


def sending_track_ids(sdp: str) -> tuple[set[str], int]:
    """Track ids (msid) of the media sections the offerer sends in, and the section count."""
    ids: set[str] = set()
    sections = sdp.split("\nm=")[1:]
    for section in sections:
        lines = [line.strip() for line in section.splitlines()]
        header = lines[0].split()
        if header[0] not in ("audio", "video") or (len(header) > 1 and header[1] == "0"):
            continue  # not media, or a rejected/stopped section
        direction = "sendrecv"
        track_id = ""
        for line in lines[1:]:
            if line[2:] in ("sendrecv", "sendonly", "recvonly", "inactive") and line[:2] == "a=":
                direction = line[2:]
            elif line.startswith("a=msid:"):
                parts = line[len("a=msid:") :].split()
                if len(parts) == 2:
                    track_id = parts[1]
        if track_id and direction in SENDING_DIRECTIONS:
            ids.add(track_id)
    return ids, len(sections)


class SignalSession:
    """One participant's connection: its WebSocket, its peer connection, its state."""

    def __init__(self, ws: web.WebSocketResponse, registry: RoomRegistry, room: Room) -> None:
        self.ws = ws
        self.registry = registry
        self.room = room
        self.participant: Participant | None = None
        self._outbox: asyncio.Queue[bytes | None] = asyncio.Queue()
        self._closing = False
        self._offer_sections = 0  # m-sections in the last publisher offer
        self.peer = PublisherPeer(on_data=self._on_data, on_connected=self._on_connected)

    # -- Session protocol (used by Room) -------------------------------------------------
    def send_signal(self, response: rtc.SignalResponse) -> None:
        if not self._closing:
            self._outbox.put_nowait(response.SerializeToString())

    def send_data(self, label: str, payload: bytes) -> None:
        self.peer.send(label, payload)

    def close(self, leave: rtc.LeaveRequest | None) -> None:
        if self._closing:
            return
        if leave is not None:
            self.send_signal(rtc.SignalResponse(leave=leave))
        self._closing = True
        self._outbox.put_nowait(None)

    # -- lifecycle --------------------------------------------------------------------------
    async def run(self, participant: Participant, join: rtc.JoinResponse) -> None:
        self.participant = participant
        self.send_signal(rtc.SignalResponse(join=join))
        writer = asyncio.create_task(self._write_loop())
        self.registry.join(self.room, participant)
        reason = models.DisconnectReason.SIGNAL_CLOSE
        try:
            async for msg in self.ws:
                if msg.type != WSMsgType.BINARY:
                    continue
                request = rtc.SignalRequest()
                request.ParseFromString(msg.data)
                if request.WhichOneof("message") == "leave":
                    reason = models.DisconnectReason.CLIENT_INITIATED
                    break
                await self._handle(request)
        finally:
            self.registry.leave(self.room, participant, reason)
            self.close(None)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer, 5)
            await self.ws.close()
            await self.peer.close()

    async def _write_loop(self) -> None:
        while (payload := await self._outbox.get()) is not None:
            try:
                await self.ws.send_bytes(payload)
            except ConnectionError:
                break
        # Ends the reader loop too when the server closes the session (kick, room deleted).
        await self.ws.close()

    # -- requests ---------------------------------------------------------------------------
    async def _handle(self, request: rtc.SignalRequest) -> None:
        participant = self.participant
        assert participant is not None
        kind = request.WhichOneof("message")
        if kind == "offer":
            await self._on_offer(participant, request.offer)
        elif kind == "trickle":
            if request.trickle.target == SIGNAL_TARGET_PUBLISHER:
                try:
                    await self.peer.add_candidate(request.trickle.candidateInit)
                except Exception as e:  # a bad candidate must not end the session
                    log.debug("ignoring candidate from %s: %s", participant.identity, e)
        elif kind == "add_track":
            self._on_add_track(participant, request.add_track)
        elif kind == "mute":
            self._on_mute(participant, request.mute)
        elif kind == "update_metadata":
            self._on_update_metadata(participant, request.update_metadata)
        elif kind == "ping_req":
            pong = rtc.Pong(last_ping_timestamp=request.ping_req.timestamp, timestamp=_now_ms())
            self.send_signal(rtc.SignalResponse(pong_resp=pong))
        elif kind == "ping":
            self.send_signal(rtc.SignalResponse(pong=_now_ms()))
        # Subscription, layer, sync-state and similar requests concern media forwarding,
        # which this server does not do.

    async def _on_offer(self, participant: Participant, offer: rtc.SessionDescription) -> None:
        answer_sdp = await self.peer.answer(offer.sdp)
        self.send_signal(
            rtc.SignalResponse(
                answer=rtc.SessionDescription(type="answer", sdp=answer_sdp, id=offer.id)
            )
        )
        sending, sections = sending_track_ids(offer.sdp)
        self._offer_sections = sections
        removed = []
        for sid, track in participant.tracks.items():
            if track.cid in sending:
                track.negotiated = True
            elif track.negotiated or sections > track.sections_at_publish:
                # Absent from an offer that was made after its transceiver was added
                # (more sections than when it was announced): the client removed it,
                # possibly before it was ever negotiated.
                removed.append(sid)
        for sid in removed:
            del participant.tracks[sid]
            self.send_signal(
                rtc.SignalResponse(track_unpublished=rtc.TrackUnpublishedResponse(track_sid=sid))
            )
            log.info(
                "unpublish room=%s identity=%s track=%s", self.room.name, participant.identity, sid
            )
        if removed:
            participant.bump()
            self.room.broadcast_participant(participant)

    def _on_add_track(self, participant: Participant, req: rtc.AddTrackRequest) -> None:
        if not participant.permission.can_publish:
            log.debug("%s may not publish; ignoring AddTrackRequest", participant.identity)
            return
        info = models.TrackInfo(
            sid=new_id(TRACK_PREFIX),
            type=req.type,
            name=req.name,
            muted=req.muted,
            width=req.width,
            height=req.height,
            simulcast=len(req.layers) > 1,
            disable_dtx=req.disable_dtx,
            source=req.source,
            layers=req.layers,
            stereo=req.stereo,
            disable_red=req.disable_red,
            encryption=req.encryption,
            stream=req.stream,
            audio_features=req.audio_features,
        )
        participant.tracks[info.sid] = PublishedTrack(
            info=info, cid=req.cid, sections_at_publish=self._offer_sections
        )
        self.send_signal(
            rtc.SignalResponse(track_published=rtc.TrackPublishedResponse(cid=req.cid, track=info))
        )
        log.info(
            "publish room=%s identity=%s track=%s kind=%s name=%s",
            self.room.name,
            participant.identity,
            info.sid,
            models.TrackType.Name(info.type),
            info.name,
        )
        participant.bump()
        self.room.broadcast_participant(participant)

    def _on_mute(self, participant: Participant, req: rtc.MuteTrackRequest) -> None:
        track = participant.tracks.get(req.sid)
        if track is None or track.info.muted == req.muted:
            return
        track.info.muted = req.muted
        participant.bump()
        self.room.broadcast_participant(participant)

    def _on_update_metadata(
        self, participant: Participant, req: rtc.UpdateParticipantMetadata
    ) -> None:
        reason = rtc.RequestResponse.Reason.OK
        if not participant.permission.can_update_metadata:
            reason = rtc.RequestResponse.Reason.NOT_ALLOWED
        else:
            if req.metadata:
                participant.metadata = req.metadata
            if req.name:
                participant.name = req.name
            participant.update_attributes(dict(req.attributes))
            participant.bump()
            self.room.broadcast_participant(participant)
        if req.request_id:
            self.send_signal(
                rtc.SignalResponse(
                    request_response=rtc.RequestResponse(request_id=req.request_id, reason=reason)
                )
            )

    # -- peer callbacks ---------------------------------------------------------------------
    def _on_data(self, label: str, payload: bytes) -> None:
        if self.participant is not None:
            data.route(self.room, self.participant, label, payload)

    def _on_connected(self) -> None:
        p = self.participant
        if p is not None and p.state == models.ParticipantInfo.State.JOINED:
            p.state = models.ParticipantInfo.State.ACTIVE
            p.bump()
            self.room.broadcast_participant(p)


def _now_ms() -> int:
    return int(time.time() * 1000)


def _query_int(request: web.Request, name: str) -> int:
    try:
        return int(request.query.get(name, "0"))
    except ValueError:
        return 0


class SignalService:
    def __init__(self, config: ServerConfig, registry: RoomRegistry) -> None:
        self.config = config
        self.registry = registry

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/rtc", self.rtc),
            web.get("/rtc/validate", self.validate),
            # This SDK build tries single-peer-connection signaling first and falls back
            # to /rtc only when /rtc/v1 answers 404.
            web.get("/rtc/v1", self.not_found),
            web.get("/rtc/v1/validate", self.not_found),
        ]

    async def not_found(self, request: web.Request) -> web.Response:
        return web.Response(status=404, text="404 page not found")

    def _check(self, request: web.Request) -> tuple[Claims, str]:
        claims = authenticate(request, self.config.keys)
        room = ensure_join(claims, request.query.get(ROOM_PARAM))
        assert claims is not None
        return claims, room

    async def validate(self, request: web.Request) -> web.Response:
        try:
            self._check(request)
        except AuthError as e:
            return web.Response(status=e.status, text=e.message)
        return web.Response(text="success")

    async def rtc(self, request: web.Request) -> web.StreamResponse:
        try:
            claims, room_name = self._check(request)
        except AuthError as e:
            return web.Response(status=e.status, text=e.message)
        room = self.registry.rooms.get(room_name)
        if (
            room is not None
            and room.max_participants
            and len(room.participants) >= room.max_participants
            and claims.identity not in room.participants
        ):
            return web.Response(status=503, text="room is full")

        ws = web.WebSocketResponse(max_msg_size=0)
        await ws.prepare(request)
        if request.query.get(RECONNECT_PARAM) in TRUE_VALUES:
            await self._refuse_resume(ws)
            return ws
        room = self.registry.get_or_create(room_name)
        session = SignalSession(ws, self.registry, room)
        participant = Participant.from_claims(
            claims, session, client_protocol=_query_int(request, CLIENT_PROTOCOL_PARAM)
        )
        others = [p.info() for p in room.participants.values() if p.identity != claims.identity]
        join = rtc.JoinResponse(
            room=room.proto(),
            participant=participant.info(),
            other_participants=others,
            server_version=SERVER_VERSION,
            subscriber_primary=False,
            ping_interval=self.config.ping_interval,
            ping_timeout=self.config.ping_timeout,
            server_info=models.ServerInfo(
                edition=models.ServerInfo.Edition.Standard,
                version=SERVER_VERSION,
                protocol=SERVER_PROTOCOL,
                node_id=self.config.node_id,
            ),
        )
        await session.run(participant, join)
        return ws

    async def _refuse_resume(self, ws: web.WebSocketResponse) -> None:
        """Sessions do not outlive their WebSocket here, so a resume never finds its
        participant. Answer like the real server does for an unknown participant
        (roommanager.go StartSession): a LeaveRequest asking for a full reconnect."""
        leave = rtc.LeaveRequest(
            can_reconnect=True,
            reason=models.DisconnectReason.STATE_MISMATCH,
            action=rtc.LeaveRequest.Action.RECONNECT,
        )
        await ws.send_bytes(rtc.SignalResponse(leave=leave).SerializeToString())
        await ws.close()
