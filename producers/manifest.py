"""Bulk manifests: many jobs in one file, every row validated before any is enqueued.

JSONL (one job object per line) or CSV (a header of Job field names; `metadata` and a `tts`
source as JSON in their cells); each bad row is reported with its line and field errors."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from avatarq.errors import JobError
from avatarq.jobs import Job, field_errors
from producers.client import FIELD_OF_REASON, prepare

#: CSV cells holding JSON rather than text.
JSON_COLUMNS = ("metadata",)


class ManifestError(ValueError):
    """The manifest cannot be read at all (unknown format, bad CSV header)."""


@dataclass(frozen=True)
class BadRow:
    line: int
    errors: list[tuple[str, str]]

    def __str__(self) -> str:
        return f"line {self.line}: " + "; ".join(f"{f}: {m}" for f, m in self.errors)


@dataclass
class Manifest:
    #: Valid jobs with the line each came from, in file order.
    jobs: list[tuple[int, Job]] = field(default_factory=list)
    invalid: list[BadRow] = field(default_factory=list)


def load_manifest(path: str | Path) -> Manifest:
    """Read and validate every row of a JSONL or CSV manifest (format from the extension)."""
    path = Path(path)
    suffix = path.suffix.lower()
    text = path.read_text(encoding="utf-8-sig")  # tolerate the BOM spreadsheets write
    if suffix in (".jsonl", ".ndjson"):
        rows = _jsonl_rows(text)
    elif suffix == ".csv":
        rows = _csv_rows(text)
    else:
        raise ManifestError(f"{path.name}: unknown manifest format (use .jsonl or .csv)")
    manifest = Manifest()
    seen: dict[str, int] = {}
    for line, payload, errors in rows:
        if not errors:
            try:
                job = Job.model_validate(payload)
            except ValidationError as e:
                errors = field_errors(e)
            else:
                if job.job_id in seen:
                    errors = [("job_id", f"duplicate of line {seen[job.job_id]}")]
                else:
                    seen[job.job_id] = line
                    manifest.jobs.append((line, job))
        if errors:
            manifest.invalid.append(BadRow(line, errors))
    return manifest


def prepare_rows(manifest: Manifest) -> None:
    """Each valid row as it will be sent (`producers.client.prepare`: its TTS rendered, its
    URLs checked); a row refused there joins the invalid ones. Raises the first `JobError`
    that may pass (a TTS engine that cannot answer now): nothing is sent then either."""
    prepared: list[tuple[int, Job]] = []
    for line, job in manifest.jobs:
        try:
            prepared.append((line, prepare(job)))
        except JobError as e:
            if not e.permanent:
                raise
            manifest.invalid.append(
                BadRow(line, [(FIELD_OF_REASON.get(e.reason, "job"), e.message)])
            )
    manifest.jobs = prepared
    manifest.invalid.sort(key=lambda bad: bad.line)


Row = tuple[int, dict[str, Any], list[tuple[str, str]]]


def _jsonl_rows(text: str) -> list[Row]:
    rows: list[Row] = []
    for line, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            payload = json.loads(raw)
        except ValueError as e:
            rows.append((line, {}, [("json", str(e))]))
            continue
        if not isinstance(payload, dict):
            rows.append((line, {}, [("job", "must be a JSON object")]))
            continue
        rows.append((line, payload, []))
    return rows


def _csv_rows(text: str) -> list[Row]:
    reader = csv.reader(io.StringIO(text, newline=""))
    header = next(reader, None)
    if not header:
        raise ManifestError("the CSV manifest is empty (the first row names the Job fields)")
    header = [h.strip() for h in header]
    unknown = [h for h in header if h not in Job.model_fields]
    if unknown:
        # Fatal even with --skip-invalid: a misspelt column would drop its value from every row.
        raise ManifestError(
            f"line 1: unknown column(s) {', '.join(map(repr, unknown))} "
            f"(columns are Job fields: {', '.join(Job.model_fields)})"
        )
    rows: list[Row] = []
    start = reader.line_num + 1
    for cells in reader:
        line, start = start, reader.line_num + 1  # a quoted cell may span lines
        if not any(c.strip() for c in cells):
            continue
        if len(cells) != len(header):
            errors = [("row", f"has {len(cells)} cells, the header has {len(header)}")]
            rows.append((line, {}, errors))
            continue
        payload, errors = _csv_payload(dict(zip(header, cells, strict=True)))
        rows.append((line, payload, errors))
    return rows


def _csv_payload(cells: dict[str, str]) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    payload: dict[str, Any] = {}
    errors: list[tuple[str, str]] = []
    for name, cell in cells.items():
        if not cell.strip():
            continue
        # A cell starting with `{` in `source` is a tts object; plain paths never do.
        if name in JSON_COLUMNS or (name == "source" and cell.lstrip().startswith("{")):
            try:
                payload[name] = json.loads(cell)
            except ValueError as e:
                errors.append((name, f"is not JSON: {e}"))
        else:
            payload[name] = cell
    return payload, errors
