"""A real S3 API for tests: `moto_server` as a subprocess on a loopback port.

The code under test talks to it over HTTP exactly as to AWS (boto3 is never patched), and
ffmpeg fetches presigned URLs from it. Credentials are dummies set in the environment, which
is where boto3 looks for them.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator
from typing import Any

import boto3
import pytest

from avatarq_dev.processes import ManagedProcess

DUMMY_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Dummy AWS credentials for boto3 in this process; nothing from ~/.aws leaks in."""
    for name, value in DUMMY_ENV.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    return DUMMY_ENV


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """The endpoint URL of a moto S3 server running for the whole test session."""
    exe = shutil.which("moto_server", path=os.path.dirname(sys.executable))
    argv = [exe] if exe else [sys.executable, "-m", "moto.server"]
    server = ManagedProcess(
        "moto",
        lambda ports: [*argv, "-H", "127.0.0.1", "-p", str(ports[0])],
        ports=["tcp"],
        env=DUMMY_ENV,
        start_timeout=60,
    )
    with server:
        yield f"http://127.0.0.1:{server.port}"


def s3_client(endpoint_url: str) -> Any:
    """A test-side client for arranging buckets and objects on the moto server."""
    return boto3.client(
        "s3",
        endpoint_url=endpoint_url,
        region_name=DUMMY_ENV["AWS_DEFAULT_REGION"],
        aws_access_key_id=DUMMY_ENV["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=DUMMY_ENV["AWS_SECRET_ACCESS_KEY"],
    )
