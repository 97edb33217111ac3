"""``whisper-batch submit --failed-only``: which listed objects their markers say to run again.

The worker writes, for input key ``K`` and output prefix ``P``, ``P + K + ".json"`` (the completion
marker, written last) or ``P + K + ".error.json"`` (``{reason, retryable, exit_code, source, ...}``);
both carry ``source.etag`` of the input they were made from (docs/architecture.md, "Output layout").
One listing of ``P + <listed prefix>`` says which markers exist; only error markers (and, when an
object has both, its completion marker) are read.

An object is run again when its error marker is for its current ETag and says

* a **retryable** failure (exit code 75 or 70: ``s3_error``, ``interrupted``, ``device_unavailable``,
  ``internal_error``; Batch's attempts ran out), or
* a **fixed** one (exit code 78: ``model_error``, ``config_error``: the image or settings were broken,
  and you re-run after fixing them).

Everything else is skipped with a reason: :data:`ALREADY_DONE` (a completion marker for this ETag),
:data:`FAILED_PERMANENTLY` (exit code 65: the input itself is bad, e.g. ``corrupt_audio``; a retry
gives the same answer), :data:`MARKER_FOR_OTHER_ETAG` (the error marker describes content since
replaced) and :data:`NO_FAILURE_MARKER` (nothing failed: pending, or never submitted; plain
``submit`` is for those); and, from the idempotency record, :data:`ALREADY_RESUBMITTED` (a job
later than the failed one is submitted and has not written a marker yet: a second
``--failed-only`` run does not submit it twice). Standalone: nothing from ``batch_job`` is imported (exit codes as in
``batch_job/exit_codes.py``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from submitter.objects import ObjectRef, normalize_etag

MARKER_SUFFIX = ".json"
ERROR_MARKER_SUFFIX = ".error.json"
#: Exit codes of failures worth running again (batch_job/exit_codes.py).
RETRYABLE_EXIT_CODES = frozenset({75, 70})
FIXED_EXIT_CODES = frozenset({78})

# Skip reasons of --failed-only (printed, and counted in the summary like the rules' reasons).
ALREADY_DONE = "already_done"
FAILED_PERMANENTLY = "failed_permanently"
MARKER_FOR_OTHER_ETAG = "marker_for_other_etag"
NO_FAILURE_MARKER = "no_failure_marker"
#: The idempotency record names a later job than the one that failed: submitted again, not run yet.
ALREADY_RESUBMITTED = "already_resubmitted"
#: Kinds of failure run again.
RETRYABLE, FIXED = "retryable", "fixed"


@dataclass(frozen=True)
class Verdict:
    """``redo``: run the object again. ``why``: the skip reason, or the kind of failure
    (:data:`RETRYABLE` / :data:`FIXED`) when ``redo``. ``failure``: the error marker's reason code."""

    redo: bool
    why: str
    failure: str | None = None
    exit_code: int | None = None
    job_id: str | None = None  # the job that failed (the error marker's job_id)

    def detail(self) -> str:
        parts = [f"failure={self.failure}"] if self.failure else []
        if self.exit_code is not None:
            parts.append(f"exit_code={self.exit_code}")
        return " ".join(parts)


def _same_etag(marker: Mapping[str, Any] | None, obj: ObjectRef) -> bool | None:
    """Whether ``marker`` was made from ``obj``'s content; ``None`` when it does not say (the
    worker failed before HEAD answered)."""
    source = (marker or {}).get("source") or {}
    etag = source.get("etag") if isinstance(source, Mapping) else None
    if not etag:
        return None
    return normalize_etag(str(etag)) == normalize_etag(obj.etag)


def failure_kind(marker: Mapping[str, Any]) -> str | None:
    """:data:`RETRYABLE`, :data:`FIXED`, or ``None`` (permanent: bad input) for an error marker."""
    code = marker.get("exit_code")
    if code in RETRYABLE_EXIT_CODES:
        return RETRYABLE
    if code in FIXED_EXIT_CODES:
        return FIXED
    if code is None and marker.get("retryable") is True:
        return RETRYABLE
    return None


def judge(obj: ObjectRef, done: Mapping[str, Any] | None, error: Mapping[str, Any] | None,
          has_done: bool) -> Verdict:
    """The verdict for one object from its markers (``done`` is read only when both exist)."""
    if error is None:
        return Verdict(False, ALREADY_DONE if has_done else NO_FAILURE_MARKER)
    if has_done and _same_etag(done, obj) is not False:  # the job succeeded after the failure
        return Verdict(False, ALREADY_DONE)
    failure, code = str(error.get("reason") or "unknown"), error.get("exit_code")
    code = code if isinstance(code, int) else None
    if _same_etag(error, obj) is False:
        return Verdict(False, MARKER_FOR_OTHER_ETAG, failure, code)
    kind = failure_kind(error)
    if kind is None:
        return Verdict(False, FAILED_PERMANENTLY, failure, code)
    job_id = error.get("job_id")
    return Verdict(True, kind, failure, code, str(job_id) if job_id else None)


class MarkerIndex:
    """The markers under ``output_prefix + listed_prefix`` of one bucket: one listing, then GETs."""

    def __init__(self, s3, bucket: str, output_prefix: str, listed_prefix: str, *, threads: int = 8) -> None:
        self.s3, self.bucket, self.output_prefix, self.threads = s3, bucket, output_prefix, threads
        self.keys: set[str] = set()
        paginator = s3.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=bucket, Prefix=output_prefix + listed_prefix):
            self.keys.update(item["Key"] for item in page.get("Contents", ()))

    def _get(self, key: str) -> dict | None:
        try:
            body = json.loads(self.s3.get_object(Bucket=self.bucket, Key=key)["Body"].read())
        except Exception as exc:  # deleted since the listing: as if it were not there
            if str(getattr(exc, "response", {}).get("Error", {}).get("Code", "")) in {"NoSuchKey", "404"}:
                return None
            raise
        return body if isinstance(body, dict) else None

    def verdicts(self, objects: Iterable[ObjectRef]) -> list[tuple[ObjectRef, Verdict]]:
        objects = list(objects)

        def one(obj: ObjectRef) -> Verdict:
            base = self.output_prefix + obj.key
            has_done = base + MARKER_SUFFIX in self.keys
            has_error = base + ERROR_MARKER_SUFFIX in self.keys
            error = self._get(base + ERROR_MARKER_SUFFIX) if has_error else None
            done = self._get(base + MARKER_SUFFIX) if has_done and error is not None else None
            return judge(obj, done, error, has_done)
        with ThreadPoolExecutor(max_workers=self.threads) as pool:
            return list(zip(objects, pool.map(one, objects)))
