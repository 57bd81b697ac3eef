"""A local stand-in for livekit-server, for development and tests.

No livekit-server binary or Docker is available here, so this package speaks enough of the
LiveKit protocol for the unmodified `livekit` Python SDK (`livekit.rtc.Room`) and
`livekit-api` (`LiveKitAPI`, `AccessToken`) to work against it::

    python -m avatarq_dev.livekit_server --host 127.0.0.1 --port 7880 \\
        --keys "devkey: secret" [--empty-timeout 300]

What it does:

* Auth: HS256 access tokens (Bearer header or `access_token` query), with the real server's
  401/400 answers; `/rtc/validate`. A `room` query naming another room than the token's is
  refused (401) where the real server would silently use the token's room.
* Signaling on `/rtc` (binary protobuf over WebSocket): JoinResponse, ParticipantUpdate on
  join/leave/metadata/attributes/tracks, ping/pong, duplicate identity kicks the older
  session, resume attempts answered with a full-reconnect LeaveRequest.
  `/rtc/v1` (single peer connection) answers 404 so the SDK uses `/rtc`.
* One aiortc peer connection per participant (the SDK's publisher connection), used only for
  its data channels; media sections are answered `inactive`.
* Data packets (user data, byte/text streams, RPC) are stamped with the sender's identity
  and forwarded to their destinations on the same channel label, in order.
* Track publication, mute and unpublish are signaled to everybody.
* RoomService Twirp API (protobuf and JSON): CreateRoom, ListRooms, DeleteRoom,
  UpdateRoomMetadata, ListParticipants, GetParticipant, RemoveParticipant,
  UpdateParticipant, SendData.

Tests get it from the `livekit_server` pytest fixture (tests/conftest.py, module scope): a
subprocess on a free loopback port with `url`, `api_key`, `api_secret` and `log_path`::

    def test_x(livekit_server):
        asyncio.run(rtc.Room().connect(livekit_server.url, token))

Limits: media is never forwarded (published tracks are announced but nobody can subscribe
to their audio/video); no TURN, no egress/ingress/SIP/agent dispatch, no webhooks. A
session ends with its WebSocket (no resume: the SDK is told to rejoin). Server-to-client
data goes through aiortc's SCTP sender, which reaches about 1 MB/s per receiver towards
libwebrtc (plenty for audio streams; bench/bench_livekit_server.py measures it).

Clients must reach the server's ICE candidates: libwebrtc ignores loopback, so run anything
that joins a room inside `infra/netns-run`, where the server's candidates are the
namespace's veth address. Outside such a namespace aiortc offers the machine's own host
addresses.
"""

from .cli import main

__all__ = ["main"]
