"""The job's tokens: each with only the grants, kind and attributes its participant needs."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import jwt
import pytest

from avatarq.settings import Settings
from tasks.link import tokens

# The test key pair is livekit-server's short dev secret on purpose.
pytestmark = pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")

TTL = timedelta(seconds=400)


def claims(token: str) -> dict[str, Any]:
    found: dict[str, Any] = jwt.decode(token, "secret", algorithms=["HS256"])
    assert found.pop("exp") - found.pop("nbf") == TTL.total_seconds()
    found.pop("jti", None)
    return found


@pytest.fixture
def job() -> tokens.JobTokens:
    return tokens.mint(
        Settings(livekit_api_key="devkey", livekit_api_secret="secret"),
        room="r1",
        worker_identity="avatarq-j1",
        avatar_identity="avatar-anna",
        ttl=TTL,
    )


def test_the_worker_sends_data_and_may_publish_a_microphone_only(job: tokens.JobTokens) -> None:
    assert claims(job.worker) == {
        "iss": "devkey",
        "sub": "avatarq-j1",
        "name": "avatarq",
        "kind": "agent",
        "video": {
            "roomJoin": True,
            "room": "r1",
            "canPublish": True,
            "canPublishSources": ["microphone"],
            "canPublishData": True,
            "canSubscribe": True,
        },
    }


def test_the_avatar_publishes_on_behalf_of_the_worker(job: tokens.JobTokens) -> None:
    assert claims(job.avatar) == {
        "iss": "devkey",
        "sub": "avatar-anna",
        "name": "avatar-anna",
        "kind": "agent",
        "attributes": {tokens.ATTRIBUTE_PUBLISH_ON_BEHALF: "avatarq-j1"},
        "video": {
            "roomJoin": True,
            "room": "r1",
            "canPublish": True,
            "canPublishData": True,
            "canSubscribe": True,
        },
    }


def test_the_keeper_is_hidden_and_allowed_nothing(job: tokens.JobTokens) -> None:
    assert claims(job.keeper) == {
        "iss": "devkey",
        "sub": tokens.keeper_identity("avatarq-j1"),
        "kind": "standard",
        "video": {
            "roomJoin": True,
            "room": "r1",
            "hidden": True,
            "canPublish": False,
            "canPublishData": False,
            "canSubscribe": False,
        },
    }
