"""Access-token verification, following livekit/livekit pkg/service/auth.go.

Tokens are HS256 JWTs: `iss` is the API key, `sub` the identity, and the `video` claim holds
the grants in lowerCamelCase (as `livekit.api.AccessToken` writes them).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import jwt

BEARER_PREFIX = "Bearer "
ACCESS_TOKEN_PARAM = "access_token"
# Clock skew tolerated on exp/nbf, as the Go server's go-jose verifier allows.
LEEWAY_SECONDS = 60


class AuthError(Exception):
    """The request is not authorised; `status` is the HTTP status the real server answers."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class VideoGrant:
    room: str = ""
    room_join: bool = False
    room_create: bool = False
    room_list: bool = False
    room_admin: bool = False
    can_publish: bool = True
    can_subscribe: bool = True
    can_publish_data: bool = True
    can_publish_sources: tuple[str, ...] = ()
    can_update_own_metadata: bool = False
    hidden: bool = False
    recorder: bool = False


@dataclass(frozen=True)
class Claims:
    api_key: str
    identity: str
    name: str = ""
    kind: str = ""
    metadata: str = ""
    attributes: dict[str, str] = field(default_factory=dict)
    video: VideoGrant | None = None


def parse_keys(spec: str) -> dict[str, str]:
    """Parse `livekit-server --keys` syntax: "key1: secret1, key2: secret2" (or newlines)."""
    keys: dict[str, str] = {}
    for item in spec.replace("\n", ",").split(","):
        if not item.strip():
            continue
        key, sep, secret = item.partition(":")
        if not sep or not key.strip() or not secret.strip():
            raise ValueError(f"bad key spec {item!r}; expected 'key: secret'")
        keys[key.strip()] = secret.strip()
    return keys


def _grant_bool(video: Mapping[str, Any], name: str, default: bool) -> bool:
    value = video.get(name)
    return default if value is None else bool(value)


def _video_grant(video: Mapping[str, Any]) -> VideoGrant:
    return VideoGrant(
        room=str(video.get("room", "")),
        room_join=_grant_bool(video, "roomJoin", False),
        room_create=_grant_bool(video, "roomCreate", False),
        room_list=_grant_bool(video, "roomList", False),
        room_admin=_grant_bool(video, "roomAdmin", False),
        # Unset publish/subscribe grants mean "allowed" on the real server.
        can_publish=_grant_bool(video, "canPublish", True),
        can_subscribe=_grant_bool(video, "canSubscribe", True),
        can_publish_data=_grant_bool(video, "canPublishData", True),
        can_publish_sources=tuple(str(s) for s in video.get("canPublishSources") or ()),
        can_update_own_metadata=_grant_bool(video, "canUpdateOwnMetadata", False),
        hidden=_grant_bool(video, "hidden", False),
        recorder=_grant_bool(video, "recorder", False),
    )


def token_from_request(authorization: str | None, query_token: str | None) -> str | None:
    """The raw token of a request, or None; a malformed Authorization header is a 401."""
    if authorization:
        if not authorization.startswith(BEARER_PREFIX):
            raise AuthError(401, "invalid authorization header. Must start with Bearer ")
        return authorization[len(BEARER_PREFIX) :]
    return query_token or None


def verify_token(token: str, keys: Mapping[str, str]) -> Claims:
    try:
        unverified = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError as e:
        raise AuthError(401, "invalid authorization token") from e
    api_key = str(unverified.get("iss", ""))
    secret = keys.get(api_key)
    if not secret:
        raise AuthError(401, "invalid API key")
    try:
        claims = jwt.decode(
            token,
            key=secret,
            algorithms=["HS256"],
            issuer=api_key,
            leeway=LEEWAY_SECONDS,
            options={"require": ["exp"]},
        )
    except jwt.PyJWTError as e:
        raise AuthError(401, f"invalid authorization token: {e}") from e
    video = claims.get("video")
    attributes = claims.get("attributes") or {}
    return Claims(
        api_key=api_key,
        identity=str(claims.get("sub", "")),
        name=str(claims.get("name", "")),
        kind=str(claims.get("kind", "")),
        metadata=str(claims.get("metadata", "")),
        attributes={str(k): str(v) for k, v in attributes.items()},
        video=_video_grant(video) if isinstance(video, Mapping) else None,
    )


def ensure_join(claims: Claims | None, requested_room: str | None) -> str:
    """The room a join token lets its bearer into, with the real server's error statuses."""
    if claims is None or claims.video is None:
        raise AuthError(401, "permissions denied")
    if not claims.video.room_join:
        raise AuthError(401, "permissions denied")
    if not claims.identity:
        raise AuthError(400, "identity cannot be empty")
    room = claims.video.room or (requested_room or "")
    if not room:
        raise AuthError(400, "room name cannot be empty")
    # The real server silently prefers the token's room; a client asking explicitly for
    # another room is refused here instead, so a mix-up never lands in the wrong room.
    if requested_room and claims.video.room and requested_room != claims.video.room:
        raise AuthError(401, "permissions denied")
    return room
