"""Resolve a job's audio source into something ffmpeg can open, safely and without downloading it.

ffmpeg reads every source itself (a path, a presigned S3 URL, or the loopback relay for
http(s)), so playback starts with the first bytes. Each source carries the
`-protocol_whitelist` it may use, so a local file cannot make the worker fetch URLs."""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

from avatarq.errors import InvalidJob, Reason, SourceNotFound, SourceUnavailable
from avatarq.settings import Settings
from avatarq.sourcepolicy import check_source_url, safe_url
from tasks.relay import RELAY_PROTOCOLS

# boto3 clients are generated at runtime; without the (optional) stubs they are untyped.
S3Client = Any

FILE_PROTOCOLS: tuple[str, ...] = ("file",)
# What an S3 (presigned HTTP(S)) stream needs inside ffmpeg: https is tls over tcp; crypto
# covers encrypted HLS. The S3 endpoint comes from settings, so ffmpeg may open it directly.
HTTP_PROTOCOLS: tuple[str, ...] = ("http", "https", "tcp", "tls", "crypto")

# S3 error codes that say "this object will not appear if you retry": permanent.
_S3_NOT_FOUND_CODES = frozenset(
    {"404", "NoSuchKey", "NotFound", "NoSuchBucket", "403", "AccessDenied", "Forbidden"}
)
# Codes that are worth a retry even though some come with a 4xx status.
_S3_TRANSIENT_CODES = frozenset(
    {
        "Throttling",
        "ThrottlingException",
        "SlowDown",
        "RequestTimeout",
        "RequestTimeTooSkewed",
        "InternalError",
        "ServiceUnavailable",
        "503",
        "500",
    }
)
# Presigned URLs must outlive the whole playback: ffmpeg re-requests the same URL (with a Range
# header) whenever it reconnects, possibly near the end of an hour-long job.
_PRESIGN_MARGIN_S = 15 * 60
_PRESIGN_MAX_S = 7 * 24 * 3600  # SigV4 limit


@dataclass(frozen=True)
class ResolvedSource:
    """What ffmpeg opens, which protocols it may use for that, and a log-safe name.

    For `kind="http"` ffmpeg opens the relay (`tasks/relay.py`) instead of `url_or_path`.
    """

    url_or_path: str
    protocols: tuple[str, ...]
    description: str
    kind: Literal["file", "http", "s3"]


def resolve(source: str, settings: Settings) -> ResolvedSource:
    """Turn a job's `source` (path, file://, http(s)://, s3://) into a `ResolvedSource`.

    Raises SourceNotFound (permanent) for a missing file or object, SourceUnavailable (transient)
    when S3 cannot be reached or throttles, InvalidJob for an unsupported or malformed source.
    Blocking (S3 calls): use `aresolve` from async code.
    """
    source = source.strip()
    if not source:
        raise InvalidJob("empty audio source", reason=Reason.INVALID_SOURCE)
    parts = urlsplit(source)
    scheme = parts.scheme.lower()
    # A one-letter "scheme" is a Windows drive (C:\...), not a URL.
    if scheme == "" or len(scheme) == 1:
        return _resolve_file(source)
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise InvalidJob(f"file URL with a remote host is not supported: {parts.netloc}")
        return _resolve_file(unquote(parts.path))
    if scheme in ("http", "https"):
        if not parts.hostname:
            raise InvalidJob("http(s) source without a host", reason=Reason.INVALID_SOURCE)
        check_source_url(source, settings, resolve=True)  # fail fast; the relay checks again
        return ResolvedSource(
            url_or_path=source, protocols=RELAY_PROTOCOLS, description=safe_url(source), kind="http"
        )
    if scheme == "s3":
        bucket, key = parts.netloc, unquote(parts.path.lstrip("/"))
        if not bucket or not key:
            raise InvalidJob(
                f"S3 source needs s3://bucket/key, got bucket={bucket!r} key={key!r}",
                reason=Reason.INVALID_SOURCE,
            )
        return _resolve_s3(bucket, key, settings)
    raise InvalidJob(
        f"unsupported audio source scheme: {scheme}://", reason=Reason.UNSUPPORTED_SCHEME
    )


async def aresolve(source: str, settings: Settings) -> ResolvedSource:
    """`resolve` off the event loop (boto3 is blocking)."""
    return await asyncio.to_thread(resolve, source, settings)


def _resolve_file(path_str: str) -> ResolvedSource:
    path = Path(path_str).expanduser().absolute()
    if not path.exists():
        raise SourceNotFound(f"audio file not found: {path}")
    if not path.is_file():
        raise SourceNotFound(f"audio source is not a regular file: {path}")
    if not os.access(path, os.R_OK):
        raise SourceNotFound(f"audio file is not readable: {path}")
    # The explicit `file:` prefix stops ffmpeg from reading a name like "x:y.wav" as protocol "x".
    return ResolvedSource(
        url_or_path=f"file:{path}", protocols=FILE_PROTOCOLS, description=str(path), kind="file"
    )


@lru_cache(maxsize=8)
def s3_client(endpoint_url: str | None, region: str | None) -> S3Client:
    # Clients are thread-safe and costly to build, so one per endpoint is shared across jobs.
    config = Config(
        signature_version="s3v4",
        connect_timeout=5,
        read_timeout=10,
        retries={"max_attempts": 3, "mode": "standard"},
        # Custom endpoints (MinIO, moto, LocalStack) rarely resolve bucket subdomains.
        s3={"addressing_style": "path" if endpoint_url else "auto"},
    )
    return boto3.client("s3", endpoint_url=endpoint_url, region_name=region, config=config)


def _resolve_s3(bucket: str, key: str, settings: Settings) -> ResolvedSource:
    name = f"s3://{bucket}/{key}"
    client = s3_client(settings.s3_endpoint_url, settings.aws_region)
    try:
        client.head_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        raise _s3_client_error(exc, client, bucket, key) from exc
    except NoCredentialsError as exc:
        # A worker misconfiguration, not a fault of the job: another worker may succeed.
        raise SourceUnavailable(
            f"no AWS credentials to read {name}", reason="s3_credentials"
        ) from exc
    except BotoCoreError as exc:
        # Connection refused/reset, DNS, timeouts: the store may be back on a retry.
        raise SourceUnavailable(f"S3 unreachable for {name}: {exc}") from exc
    expires = min(int(settings.max_job_duration_s) + _PRESIGN_MARGIN_S, _PRESIGN_MAX_S)
    url = client.generate_presigned_url(
        "get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=expires
    )
    return ResolvedSource(url_or_path=url, protocols=HTTP_PROTOCOLS, description=name, kind="s3")


def _s3_client_error(exc: ClientError, client: S3Client, bucket: str, key: str) -> Exception:
    error = exc.response.get("Error", {})
    code = str(error.get("Code", ""))
    status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    name = f"s3://{bucket}/{key}"
    if code in _S3_TRANSIENT_CODES or status >= 500 or status == 429:
        return SourceUnavailable(f"S3 error for {name}: {code or status}")
    if code in _S3_NOT_FOUND_CODES or status in (403, 404):
        # HEAD responses have no body, so a 404 does not say whether the bucket or the key is
        # missing; one more HEAD on the bucket makes the message actionable.
        what = "object not found" if status != 403 else "access denied"
        if status == 404 and not _bucket_exists(client, bucket):
            what = "bucket does not exist"
        return SourceNotFound(f"{what}: bucket={bucket!r} key={key!r} ({name})")
    return SourceNotFound(f"S3 refused {name}: {code or status} (bucket={bucket!r} key={key!r})")


def _bucket_exists(client: S3Client, bucket: str) -> bool:
    try:
        client.head_bucket(Bucket=bucket)
    except ClientError as exc:
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        return status != 404
    except BotoCoreError:
        return True  # unknown: keep the generic "object not found" wording
    return True
