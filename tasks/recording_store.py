"""Where a job's recording goes: the job's `s3://bucket/prefix/`, else `AVATARQ_RECORDINGS`
(an S3 prefix or a local directory). Credentials come from the worker's settings only."""

from __future__ import annotations

import shutil
from pathlib import Path
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


def store(path: Path, destination: str, name: str, *, partial: bool, settings: Settings) -> str:
    """Put the finished MP4 at `destination` + `name`; returns its URL."""
    if destination.startswith("s3://"):
        # Here, not at the top: boto3 is a third of the recorder's start-up (docs/recordings.md),
        # and a local store needs none of it.
        from botocore.exceptions import BotoCoreError, ClientError

        from tasks.source import s3_client

        parts = urlsplit(destination)
        bucket, key = parts.netloc, parts.path.lstrip("/") + name
        metadata = {"partial": "true" if partial else "false"}
        try:
            s3_client(settings.s3_endpoint_url, settings.aws_region).upload_file(
                str(path),
                bucket,
                key,
                ExtraArgs={"ContentType": "video/mp4", "Metadata": metadata},
            )
        except (BotoCoreError, ClientError) as e:
            raise StoreError(f"could not upload the recording to s3://{bucket}/{key}: {e}") from e
        return f"s3://{bucket}/{key}"
    target = Path(destination).expanduser().resolve() / name
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(path, target)
    except OSError as e:
        raise StoreError(f"could not store the recording at {target}: {e}") from e
    return target.as_uri()
