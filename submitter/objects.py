"""The S3 objects the submitter turns into jobs: :class:`ObjectRef` and the one form of its etag.

Plain data at the bottom of the package, importing nothing of it: every other module
(:mod:`submitter.packs`, :mod:`submitter.manifest`, :mod:`submitter.jobs`, the entry points) takes
objects in this shape, so they all import it from here, and ``jobs`` -> ``packs`` / ``manifest``
stays one way (they used to import ``ObjectRef`` back from ``jobs``).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ObjectRef:
    """An S3 object to transcribe. ``key`` is decoded (never URL-encoded); ``etag`` unquoted."""

    bucket: str
    key: str
    etag: str = ""
    size: int | None = None
    version_id: str | None = None

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.key}"


def normalize_etag(etag: str | None) -> str:
    """ETags arrive quoted from HeadObject/ListObjects and unquoted in notifications."""
    return (etag or "").strip().strip('"')
