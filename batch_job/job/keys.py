"""Where a job's outputs go: ``PREFIX + full input key + suffix``, and what a marker vouches for."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from batch_job.s3io import ObjectInfo, normalize_etag

#: Output prefix when neither ``--output`` nor ``WHISPER_BATCH_OUTPUT_URI`` is given.
DEFAULT_OUTPUT_PREFIX = "transcripts/"
#: Tag on every error marker: the stack's lifecycle rule expires objects under the output prefix
#: carrying it (S3 lifecycle cannot match the ``.error.json`` suffix; see docs/deploy.md).
ERROR_MARKER_TAGS = {"whisper-batch:marker": "error"}


def output_key(prefix: str, input_key: str, suffix: str) -> str:
    """``PREFIX + full input key + suffix``: the key is kept verbatim (spaces, unicode, ``+``)."""
    return f"{prefix}{input_key}{suffix}"


MARKER_SUFFIX = ".json"
ERROR_MARKER_SUFFIX = ".error.json"


def marker_key(prefix: str, input_key: str) -> str:
    """The completion marker (the ``.json`` transcript, written last)."""
    return output_key(prefix, input_key, MARKER_SUFFIX)


def error_marker_key(prefix: str, input_key: str) -> str:
    return output_key(prefix, input_key, ERROR_MARKER_SUFFIX)


def same_version(marker: Mapping[str, Any] | None, info: ObjectInfo) -> bool:
    """Whether a marker's ``source`` names the object version ``info`` describes (ETag, VersionId)."""
    if not marker:
        return False
    source = marker.get("source") or {}
    if not isinstance(source, Mapping) or normalize_etag(str(source.get("etag") or "")) != normalize_etag(info.etag):
        return False
    old_version = source.get("version_id")
    return not (old_version and info.version_id and old_version != info.version_id)
