"""Where a job's recording goes: the job's `s3://bucket/prefix/`, else `AVATARQ_RECORDINGS`
(an S3 prefix or a local directory), the MP4 and its WebVTT beside it. Credentials come from
the worker's settings only."""

from __future__ import annotations

import shutil
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

from avatarq.jobs import Job
from avatarq.settings import Settings


class StoreError(Exception):
    """The recording could not be stored (its message names where and why)."""


def destination_of(job: Job, settings: Settings) -> str | None:
    """The job's destination, None when it records nothing; ValueError when it asks for a
    recording and the worker has nowhere to put it."""
    if job.record is False:
        return None
    if isinstance(job.record, str):
        bucket = urlsplit(job.record).netloc
        if bucket not in allowed_buckets(settings):
            raise ValueError(
                f"the job's record bucket {bucket!r} is not in AVATARQ_RECORDING_BUCKETS "
                "(nor the bucket of AVATARQ_RECORDINGS)"
            )
        return job.record
    if not settings.recordings:
        raise ValueError("the job asks for a recording and AVATARQ_RECORDINGS is not set")
    return settings.recordings


def allowed_buckets(settings: Settings) -> set[str]:
    buckets = {b.strip() for b in settings.recording_buckets.split(",") if b.strip()}
    if settings.recordings and settings.recordings.startswith("s3://"):
        buckets.add(urlsplit(settings.recordings).netloc)
    return buckets


def object_name(job_id: str, attempt: int) -> str:
    """Each attempt its own file, under the job's id (captions go beside it)."""
    return f"{job_id}/attempt-{attempt}.mp4"


def captions_name(name: str) -> str:
    """The WebVTT file beside the MP4 `name`."""
    return str(PurePosixPath(name).with_suffix(".vtt"))


def egress_filepath(destination: str, name: str) -> str:
    """Where Egress writes the MP4 in its own storage: under the key prefix of an S3
    destination (beside the WebVTT when Egress stores to that bucket), else at `name`."""
    if destination.startswith("s3://"):
        return urlsplit(destination).path.lstrip("/") + name
    return name


def store(path: Path, destination: str, name: str, *, partial: bool, settings: Settings) -> str:
    """Put the finished MP4 at `destination` + `name` (the file moves); returns its URL."""
    metadata = {"partial": "true" if partial else "false"}
    return _put(path, destination, name, "video/mp4", metadata, settings)


def store_captions(text: str, destination: str, name: str, *, settings: Settings) -> str:
    """Put a recording's WebVTT at `destination` + `name`, as the MP4 is; returns its URL."""
    return _put(text.encode(), destination, name, "text/vtt", {}, settings)


def _put(
    data: Path | bytes,
    destination: str,
    name: str,
    content_type: str,
    metadata: dict[str, str],
    settings: Settings,
) -> str:
    if destination.startswith("s3://"):
        # Here, not at the top: boto3 is a third of the recorder's start-up (docs/recordings.md),
        # and a local store needs none of it.
        from botocore.exceptions import BotoCoreError, ClientError

        from tasks.source import s3_client

        parts = urlsplit(destination)
        bucket, key = parts.netloc, parts.path.lstrip("/") + name
        client = s3_client(settings.s3_endpoint_url, settings.aws_region)
        extra = {"ContentType": content_type, "Metadata": metadata}
        try:
            if isinstance(data, Path):
                client.upload_file(str(data), bucket, key, ExtraArgs=extra)
            else:
                client.put_object(Bucket=bucket, Key=key, Body=data, **extra)
        except (BotoCoreError, ClientError) as e:
            raise StoreError(f"could not upload {name} to s3://{bucket}/{key}: {e}") from e
        return f"s3://{bucket}/{key}"
    target = Path(destination).expanduser().resolve() / name
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(data, Path):
            shutil.move(data, target)
        else:
            target.write_bytes(data)
    except OSError as e:
        raise StoreError(f"could not store {name} at {target}: {e}") from e
    return target.as_uri()
