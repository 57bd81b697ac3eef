"""RoomService over Twirp: POST /twirp/livekit.RoomService/<Method>.

Bodies are protobuf or JSON according to Content-Type, answered in kind; errors use Twirp's
JSON error format with its HTTP statuses. Permission checks follow livekit/livekit
pkg/service/roomservice.go (a failed check is Twirp `unauthenticated`, as there).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web
from google.protobuf import json_format
from google.protobuf.message import DecodeError, Message
from livekit.protocol import models, rtc
from livekit.protocol import room as room_pb

from . import data
from .auth import AuthError, Claims, VideoGrant, token_from_request, verify_token
from .config import ServerConfig
from .room import Participant, Room, RoomRegistry

TWIRP_PREFIX = "/twirp/livekit.RoomService/"
CONTENT_TYPE_JSON = "application/json"
CONTENT_TYPE_PROTOBUF = "application/protobuf"

# Twirp error codes and their HTTP statuses (twirp spec, "Error codes").
TWIRP_STATUS = {
    "invalid_argument": 400,
    "malformed": 400,
    "unauthenticated": 401,
    "permission_denied": 403,
    "not_found": 404,
    "bad_route": 404,
    "internal": 500,
}


class TwirpError(Exception):
    def __init__(self, code: str, msg: str) -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg

    def response(self) -> web.Response:
        body = json.dumps({"code": self.code, "msg": self.msg})
        return web.Response(
            status=TWIRP_STATUS[self.code], text=body, content_type=CONTENT_TYPE_JSON
        )


def _denied() -> TwirpError:
    return TwirpError("unauthenticated", "permissions denied")


def _room_not_found() -> TwirpError:
    return TwirpError("not_found", "requested room does not exist")


def _participant_not_found() -> TwirpError:
    return TwirpError("not_found", "participant does not exist")


Handler = Callable[[Message, VideoGrant], Awaitable[Message]]


@dataclass(frozen=True)
class Method:
    request_type: type[Message]
    handler: Handler


class RoomService:
    def __init__(self, config: ServerConfig, registry: RoomRegistry) -> None:
        self.config = config
        self.registry = registry
        self.methods: dict[str, Method] = {
            "CreateRoom": Method(room_pb.CreateRoomRequest, self.create_room),
            "ListRooms": Method(room_pb.ListRoomsRequest, self.list_rooms),
            "DeleteRoom": Method(room_pb.DeleteRoomRequest, self.delete_room),
            "UpdateRoomMetadata": Method(room_pb.UpdateRoomMetadataRequest, self.update_room),
            "ListParticipants": Method(room_pb.ListParticipantsRequest, self.list_participants),
            "GetParticipant": Method(room_pb.RoomParticipantIdentity, self.get_participant),
            "RemoveParticipant": Method(room_pb.RoomParticipantIdentity, self.remove_participant),
            "UpdateParticipant": Method(room_pb.UpdateParticipantRequest, self.update_participant),
            "SendData": Method(room_pb.SendDataRequest, self.send_data),
        }

    def routes(self) -> list[web.RouteDef]:
        return [web.post(TWIRP_PREFIX + "{method}", self.handle)]

    async def handle(self, request: web.Request) -> web.Response:
        try:
            method = self.methods.get(request.match_info["method"])
            if method is None:
                raise TwirpError("bad_route", f"no handler for path {request.path}")
            grant = self._grant(request)
            is_json = request.content_type == CONTENT_TYPE_JSON
            message = method.request_type()
            body = await request.read()
            try:
                if is_json:
                    json_format.Parse(body or b"{}", message, ignore_unknown_fields=True)
                else:
                    message.ParseFromString(body)
            except (DecodeError, json_format.ParseError) as e:
                raise TwirpError("malformed", f"could not decode request: {e}") from e
            result = await method.handler(message, grant)
        except TwirpError as e:
            return e.response()
        if is_json:
            return web.Response(
                text=json_format.MessageToJson(result), content_type=CONTENT_TYPE_JSON
            )
        return web.Response(body=result.SerializeToString(), content_type=CONTENT_TYPE_PROTOBUF)

    def _grant(self, request: web.Request) -> VideoGrant:
        try:
            token = token_from_request(request.headers.get("Authorization"), None)
            claims: Claims | None = verify_token(token, self.config.keys) if token else None
        except AuthError as e:
            raise TwirpError("unauthenticated", e.message) from e
        if claims is None or claims.video is None:
            raise _denied()
        return claims.video

    # -- lookups ----------------------------------------------------------------------------
    def _room(self, name: str) -> Room:
        room = self.registry.rooms.get(name)
        if room is None:
            raise _room_not_found()
        return room

    def _participant(self, room_name: str, identity: str) -> tuple[Room, Participant]:
        room = self._room(room_name)
        participant = room.participants.get(identity)
        if participant is None:
            raise _participant_not_found()
        return room, participant

    @staticmethod
    def _admin(grant: VideoGrant, room: str) -> None:
        if not grant.room_admin or grant.room != room:
            raise _denied()

    # -- methods ----------------------------------------------------------------------------
    async def create_room(self, req: Message, grant: VideoGrant) -> Message:
        assert isinstance(req, room_pb.CreateRoomRequest)
        if not grant.room_create:
            raise _denied()
        if not req.name:
            raise TwirpError("invalid_argument", "room name cannot be empty")
        room = self.registry.get_or_create(
            req.name,
            empty_timeout=req.empty_timeout,
            departure_timeout=req.departure_timeout,
            max_participants=req.max_participants,
            metadata=req.metadata,
        )
        return room.proto()

    async def list_rooms(self, req: Message, grant: VideoGrant) -> Message:
        assert isinstance(req, room_pb.ListRoomsRequest)
        if not grant.room_list:
            raise _denied()
        names = set(req.names)
        rooms = [r.proto() for r in self.registry.rooms.values() if not names or r.name in names]
        return room_pb.ListRoomsResponse(rooms=rooms)

    async def delete_room(self, req: Message, grant: VideoGrant) -> Message:
        assert isinstance(req, room_pb.DeleteRoomRequest)
        if not grant.room_create:
            raise _denied()
        self.registry.delete(self._room(req.room))
        return room_pb.DeleteRoomResponse()

    async def update_room(self, req: Message, grant: VideoGrant) -> Message:
        assert isinstance(req, room_pb.UpdateRoomMetadataRequest)
        self._admin(grant, req.room)
        room = self._room(req.room)
        room.metadata = req.metadata
        room.broadcast(_room_update(room))
        return room.proto()

    async def list_participants(self, req: Message, grant: VideoGrant) -> Message:
        assert isinstance(req, room_pb.ListParticipantsRequest)
        self._admin(grant, req.room)
        room = self._room(req.room)
        return room_pb.ListParticipantsResponse(
            participants=[p.info() for p in room.participants.values()]
        )

    async def get_participant(self, req: Message, grant: VideoGrant) -> Message:
        assert isinstance(req, room_pb.RoomParticipantIdentity)
        self._admin(grant, req.room)
        return self._participant(req.room, req.identity)[1].info()

    async def remove_participant(self, req: Message, grant: VideoGrant) -> Message:
        assert isinstance(req, room_pb.RoomParticipantIdentity)
        self._admin(grant, req.room)
        room, participant = self._participant(req.room, req.identity)
        self.registry.kick(room, participant, models.DisconnectReason.PARTICIPANT_REMOVED)
        return room_pb.RemoveParticipantResponse()

    async def update_participant(self, req: Message, grant: VideoGrant) -> Message:
        assert isinstance(req, room_pb.UpdateParticipantRequest)
        self._admin(grant, req.room)
        room, participant = self._participant(req.room, req.identity)
        if req.metadata:
            participant.metadata = req.metadata
        if req.name:
            participant.name = req.name
        if req.HasField("permission"):
            participant.permission.CopyFrom(req.permission)
        participant.update_attributes(dict(req.attributes))
        participant.bump()
        room.broadcast_participant(participant)
        return participant.info()

    async def send_data(self, req: Message, grant: VideoGrant) -> Message:
        assert isinstance(req, room_pb.SendDataRequest)
        self._admin(grant, req.room)
        room = self._room(req.room)
        packet = models.DataPacket(
            kind=req.kind,
            destination_identities=req.destination_identities,
            user=models.UserPacket(
                payload=req.data,
                topic=req.topic if req.HasField("topic") else None,
                destination_identities=req.destination_identities,
                nonce=req.nonce,
            ),
        )
        data.route(room, None, data.label_for_kind(req.kind), packet.SerializeToString())
        return room_pb.SendDataResponse()


def _room_update(room: Room) -> rtc.SignalResponse:
    return rtc.SignalResponse(room_update=rtc.RoomUpdate(room=room.proto()))
