"""Pack manifests: the JSON Lines file a pack job's (or an array of packs') ``input`` names.

The contract with the worker (docs/submitter.md, "Manifest"): the file lives at
``s3://BUCKET/<OUTPUT_PREFIX>_manifests/<UTC yyyymmddThhmmssZ>-<10 hex>.jsonl`` (expired by the
bucket's lifecycle rule) and holds one line per object::

    {"index": 0, "input": "s3://B/K", "output": "s3://B/<OUTPUT_PREFIX>", "etag": "...", "size": 1234}

``index`` is the array element the object belongs to: every line of a plain pack job has
``index`` 0; an array job's element ``i`` is every line with ``index`` ``i``. The PUT carries the
metadata ``count`` (objects) and ``job-definition``.

Building a manifest is pure (:func:`build_manifest`); :meth:`Manifest.put` is the one S3 call.
The 10 hex characters hash the body, so the name is unique per content and a retried PUT of the
same pack rewrites the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from submitter.objects import ObjectRef

#: Folder under the output prefix (the stack's lifecycle rule expires it; the job role reads it).
MANIFEST_DIR = "_manifests/"
CONTENT_TYPE = "application/x-ndjson"
_HASH_CHARS = 10


@dataclass(frozen=True)
class Manifest:
    """A manifest ready to PUT: where it goes, its bytes and what its metadata says."""

    bucket: str
    key: str
    body: bytes
    count: int
    job_definition: str
    output: str

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.key}"

    @property
    def name(self) -> str:
        """``<stamp>-<hash>``: the file name without folder and extension (job names use it)."""
        return self.key.rsplit("/", 1)[-1].removesuffix(".jsonl")

    def put(self, s3: Any) -> None:
        """Write it (the caller submits the job only after this returned)."""
        s3.put_object(
            Bucket=self.bucket, Key=self.key, Body=self.body, ContentType=CONTENT_TYPE,
            Metadata={"count": str(self.count), "job-definition": self.job_definition},
        )


def manifest_lines(elements: Sequence[Sequence[ObjectRef]], output: str) -> list[str]:
    """One JSON line per object; ``elements[i]`` are the objects of array element ``i``."""
    return [
        json.dumps({"index": index, "input": obj.uri, "output": output, "etag": obj.etag, "size": obj.size},
                   ensure_ascii=False, separators=(",", ":"))
        for index, objects in enumerate(elements)
        for obj in objects
    ]


def build_manifest(elements: Sequence[Sequence[ObjectRef]], *, output_prefix: str, job_definition: str,
                   now: float | None = None) -> Manifest:
    """The manifest of ``elements`` (one element for a plain pack job, one per array element).

    Every object must be in the same bucket: the manifest and the outputs live there."""
    buckets = {obj.bucket for objects in elements for obj in objects}
    if len(buckets) != 1:
        raise ValueError(f"a manifest covers objects of exactly one bucket, got {sorted(buckets)}")
    (bucket,) = buckets
    output = f"s3://{bucket}/{output_prefix}"
    lines = manifest_lines(elements, output)
    body = ("\n".join(lines) + "\n").encode("utf-8")
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(time.time() if now is None else now))
    digest = hashlib.sha256(body).hexdigest()[:_HASH_CHARS]
    return Manifest(
        bucket=bucket,
        key=f"{output_prefix}{MANIFEST_DIR}{stamp}-{digest}.jsonl",
        body=body,
        count=len(lines),
        job_definition=job_definition,
        output=output,
    )
