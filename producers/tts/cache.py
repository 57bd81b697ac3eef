"""Content-addressed storage for rendered speech: S3 when `AVATARQ_TTS_BUCKET` is set, else a
local directory (`AVATARQ_TTS_CACHE_DIR`).

The key is the sha256 of everything that decides the audio, so the same request is rendered
once and every later job points at the stored file. Objects are found by key alone (any
extension), so the format need not be known before the lookup.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Protocol

import boto3
from botocore.exceptions import BotoCoreError, ClientError

from avatarq.errors import PermanentJobError, Reason, TransientJobError
from avatarq.settings import Settings
from producers.tts.base import Speech

#: S3 error codes that no retry fixes: the bucket or the permission is wrong.
_S3_PERMANENT_CODES = frozenset({"AccessDenied", "NoSuchBucket", "InvalidBucketName", "403"})


def cache_key(
    engine_identity: str, voice: str | None, language: str | None, text: str, ssml: bool
) -> str:
    """sha256 over a JSON array: unambiguous where plain concatenation of fields is not."""
    material = json.dumps([engine_identity, voice, language, ssml, text], ensure_ascii=False)
    return hashlib.sha256(material.encode()).hexdigest()


class AudioStore(Protocol):
    def find(self, key: str) -> str | None:
        """The stored audio's job source (path or s3:// URL), if this key was rendered."""
        ...

    def put(self, key: str, speech: Speech) -> str:
        """Store the audio; returns its job source."""
        ...


class LocalStore:
    """Files under `root/ab/abcdef….ext`, written atomically (temp file + rename)."""

    def __init__(self, root: Path) -> None:
        self.root = root.expanduser().absolute()

    def find(self, key: str) -> str | None:
        hit = next(self.root.glob(f"{key[:2]}/{key}.*"), None)
        return str(hit) if hit else None

    def put(self, key: str, speech: Speech) -> str:
        folder = self.root / key[:2]
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / f"{key}.{speech.extension}"
        # The temp name does not start with the key, so `find` never sees a partial file.
        fd, tmp = tempfile.mkstemp(prefix=".partial-", dir=folder)
        with os.fdopen(fd, "wb") as f:
            f.write(speech.audio)
        os.replace(tmp, target)
        return str(target)


class S3Store:
    """Objects `s3://bucket/{prefix}{key}.ext` (endpoint and region from settings)."""

    def __init__(self, bucket: str, prefix: str, client: Any) -> None:
        self.bucket, self.prefix, self.client = bucket, prefix, client

    def find(self, key: str) -> str | None:
        listing = self._call(
            "list_objects_v2", Bucket=self.bucket, Prefix=f"{self.prefix}{key}.", MaxKeys=1
        )
        found = listing.get("Contents") or []
        return f"s3://{self.bucket}/{found[0]['Key']}" if found else None

    def put(self, key: str, speech: Speech) -> str:
        name = f"{self.prefix}{key}.{speech.extension}"
        self._call(
            "put_object",
            Bucket=self.bucket,
            Key=name,
            Body=speech.audio,
            ContentType=speech.content_type,
        )
        return f"s3://{self.bucket}/{name}"

    def _call(self, operation: str, **kwargs: Any) -> Any:
        where = f"s3://{self.bucket}/{self.prefix}"
        try:
            return getattr(self.client, operation)(**kwargs)
        except ClientError as e:
            code = str(e.response.get("Error", {}).get("Code", ""))
            cls = PermanentJobError if code in _S3_PERMANENT_CODES else TransientJobError
            raise cls(
                f"tts storage {where}: {operation} failed: {code}", reason=Reason.TTS_STORAGE
            ) from None
        except BotoCoreError as e:
            raise TransientJobError(
                f"tts storage {where}: {e}", reason=Reason.TTS_STORAGE
            ) from None


def store_for(settings: Settings) -> AudioStore:
    if settings.tts_bucket:
        client = boto3.client(
            "s3", endpoint_url=settings.s3_endpoint_url, region_name=settings.aws_region
        )
        return S3Store(settings.tts_bucket, settings.tts_prefix, client)
    return LocalStore(settings.tts_cache_dir)
