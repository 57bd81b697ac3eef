"""Source resolution: local paths and URLs, and S3 against a real (moto) S3 server."""

from __future__ import annotations

import asyncio
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from avatarq.errors import InvalidJob, SourceNotFound, SourceUnavailable
from avatarq.settings import Settings
from tasks.relay import RELAY_PROTOCOLS
from tasks.source import FILE_PROTOCOLS, HTTP_PROTOCOLS, aresolve, resolve
from tests.ports import refused_port
from tests.s3 import aws_env, s3_client, s3_server

__all__ = ["aws_env", "s3_server"]  # fixtures used by name below

pytestmark = pytest.mark.timeout(60)


def s3_settings(endpoint: str) -> Settings:
    return Settings(s3_endpoint_url=endpoint, aws_region="us-east-1")


def test_local_path(tmp_path: Path) -> None:
    audio = tmp_path / "a b.wav"
    audio.write_bytes(b"RIFF")
    resolved = resolve(str(audio), Settings())
    assert resolved.kind == "file"
    assert resolved.url_or_path == f"file:{audio}"
    assert resolved.protocols == FILE_PROTOCOLS
    assert resolved.description == str(audio)


def test_file_url_is_unquoted(tmp_path: Path) -> None:
    audio = tmp_path / "a b.wav"
    audio.write_bytes(b"RIFF")
    resolved = resolve(f"file://{tmp_path}/a%20b.wav", Settings())
    assert resolved.url_or_path == f"file:{audio}"


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.mp3"
    with pytest.raises(SourceNotFound, match="nope.mp3") as info:
        resolve(str(missing), Settings())
    assert info.value.permanent


def test_directory_is_not_a_source(tmp_path: Path) -> None:
    with pytest.raises(SourceNotFound, match="not a regular file"):
        resolve(str(tmp_path), Settings())


@pytest.mark.parametrize("source", ["ftp://example.com/a.mp3", "gopher://x/y", "data:,abc"])
def test_unsupported_scheme(source: str) -> None:
    scheme = source.split(":")[0]
    with pytest.raises(InvalidJob, match=f"{scheme}") as info:
        resolve(source, Settings())
    assert info.value.permanent


@pytest.mark.parametrize("source", ["", "   ", "s3://bucket-only", "s3:///key", "http:///x"])
def test_malformed_sources(source: str) -> None:
    with pytest.raises(InvalidJob):
        resolve(source, Settings())


def test_http_description_hides_credentials_and_query() -> None:
    url = "https://user:hunter2@cdn.example.com:8443/a/b.mp3?token=SECRET&sig=abc"
    resolved = resolve(url, Settings())
    assert resolved.kind == "http"
    assert resolved.url_or_path == url
    assert resolved.protocols == RELAY_PROTOCOLS  # ffmpeg reads it through the relay
    assert resolved.description == "https://cdn.example.com:8443/a/b.mp3"


def test_s3_object_resolves_to_presigned_url(s3_server: str, aws_env: dict[str, str]) -> None:
    s3 = s3_client(s3_server)
    s3.create_bucket(Bucket="voices")
    s3.put_object(Bucket="voices", Key="jobs/one two.mp3", Body=b"ID3 not really")
    resolved = asyncio.run(aresolve("s3://voices/jobs/one%20two.mp3", s3_settings(s3_server)))
    assert resolved.kind == "s3"
    assert resolved.protocols == HTTP_PROTOCOLS
    assert resolved.description == "s3://voices/jobs/one two.mp3"
    url = urlsplit(resolved.url_or_path)
    assert f"{url.scheme}://{url.netloc}" == s3_server
    assert "X-Amz-Signature=" in url.query
    assert "Signature" not in resolved.description


def test_s3_missing_key(s3_server: str, aws_env: dict[str, str]) -> None:
    s3_client(s3_server).create_bucket(Bucket="has-no-key")
    with pytest.raises(SourceNotFound, match="object not found") as info:
        resolve("s3://has-no-key/missing.wav", s3_settings(s3_server))
    assert "has-no-key" in info.value.message and "missing.wav" in info.value.message
    assert info.value.permanent


def test_s3_missing_bucket(s3_server: str, aws_env: dict[str, str]) -> None:
    with pytest.raises(SourceNotFound, match="bucket does not exist") as info:
        resolve("s3://no-such-bucket-here/a.wav", s3_settings(s3_server))
    assert "no-such-bucket-here" in info.value.message and "a.wav" in info.value.message


def test_s3_endpoint_refusing_connections_is_transient(aws_env: dict[str, str]) -> None:
    with refused_port() as port, pytest.raises(SourceUnavailable) as info:
        resolve("s3://bucket/key.wav", s3_settings(f"http://127.0.0.1:{port}"))
    assert not info.value.permanent
    assert "s3://bucket/key.wav" in info.value.message
