"""Pack manifests: the JSON Lines file that tells a job which objects are its pack.

Contract (written by the submitter, ``submitter/manifest.py``; docs/submitter.md), one line per
object under ``<OutputPrefix>_manifests/``::

    {"index": 0, "input": "s3://B/K", "output": "s3://B/PREFIX/", "etag": "...", "size": 1234}

* ``index`` is the AWS Batch array element the object belongs to; a line without it counts as
  its 0-based line number (blank lines skipped), so one-object-per-element manifests still work.
  ``{"bucket": ..., "key": ...}`` lines are accepted too.
* A plain job (no ``AWS_BATCH_JOB_ARRAY_INDEX``) is every line; array element ``i`` is every
  line whose index is ``i``.
* ``etag`` is what the submitter saw, for progress reporting; the job transcribes the object's
  current version and records the ETag it HEADed in the marker.

Anything else (an unreadable manifest, a line that is not JSON or names no input, an element
with no line) is a :class:`~batch_job.errors.ConfigError`: the submission is broken, not the audio.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from batch_job import s3io
from batch_job.errors import ConfigError, WhisperBatchError


@dataclass(frozen=True)
class PackEntry:
    """One object of a pack: where it is and, if the line says, where its outputs go."""

    index: int
    input_uri: str
    output_uri: str | None = None
    etag: str | None = None
    size: int | None = None


def is_manifest_uri(uri: str | None) -> bool:
    """Manifests are JSON Lines objects (``<OutputPrefix>_manifests/*.jsonl``)."""
    return bool(uri) and str(uri).startswith("s3://") and str(uri).lower().endswith(".jsonl")


def pack_entries(text: str, index: int | None = None) -> list[PackEntry]:
    """The entries of element ``index`` (``None`` = every line), in manifest order, duplicates dropped."""
    entries: list[PackEntry] = []
    seen: set[tuple[str, str | None]] = set()
    for n, line in enumerate(row for row in text.splitlines() if row.strip()):
        try:
            raw = json.loads(line)
        except ValueError as exc:
            raise ConfigError(f"manifest line {n} is not JSON: {exc}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"manifest line {n} is not a JSON object")
        entry = _entry(raw, n)
        if index is not None and entry.index != index:
            continue
        if (entry.input_uri, entry.output_uri) not in seen:  # one object listed twice is done once
            seen.add((entry.input_uri, entry.output_uri))
            entries.append(entry)
    if not entries:
        where = "the manifest" if index is None else f"array element {index}"
        raise ConfigError(f"{where} lists no object")
    return entries


def read_pack(s3, manifest_uri: str, index: int | None = None) -> list[PackEntry]:
    """:func:`pack_entries` of the manifest at ``manifest_uri`` (ConfigError if it is gone)."""
    try:
        uri = s3io.S3Uri.parse(manifest_uri)
    except ValueError as exc:
        raise ConfigError(f"bad manifest URI: {exc}") from None
    try:
        text = s3io.get_text(s3, uri.bucket, uri.key)
    except WhisperBatchError as exc:
        if exc.reason == "missing_input":  # the manifest itself is gone: a submission problem
            raise ConfigError(f"manifest does not exist: {manifest_uri}") from None
        raise
    try:
        return pack_entries(text, index)
    except ConfigError as exc:
        raise ConfigError(f"{exc} ({manifest_uri})") from None


def _entry(raw: dict, line_number: int) -> PackEntry:
    index = raw.get("index", line_number)
    if not isinstance(index, int):
        raise ConfigError(f"manifest line {line_number}: index must be an integer, not {index!r}")
    if raw.get("input"):
        input_uri = str(raw["input"])
    elif raw.get("bucket") and raw.get("key"):
        input_uri = f"s3://{raw['bucket']}/{raw['key']}"
    else:
        raise ConfigError(f'manifest line {line_number} names no input ({{"input": "s3://..."}})')
    size = raw.get("size")
    return PackEntry(index=index, input_uri=input_uri, output_uri=str(raw["output"]) if raw.get("output") else None,
                     etag=str(raw["etag"]) if raw.get("etag") else None, size=size if isinstance(size, int) else None)
