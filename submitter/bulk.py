"""``whisper-batch submit s3://BUCKET/PREFIX/``: backfill objects that already exist.

Lists the prefix (paginated), applies the same skip rules as the Lambda handler
(:mod:`submitter.rules`) and the same idempotency records (:mod:`submitter.jobs`), and prints
one line per object (``submitted`` / ``duplicate`` / ``skipped`` / ``failed`` / ``queued``) and
a summary.

* Up to ``--array-threshold`` (default 1,000) submittable objects: one job per object, exactly
  as the handler submits them.
* More: the objects are written to manifests (JSON Lines) under
  ``s3://BUCKET/<OUTPUT_PREFIX>_manifests/`` and submitted as array jobs, one per manifest
  (at most 10,000 elements each; standard and long-timeout objects in separate manifests).
  Each object's idempotency record is claimed before the array job is submitted and completed
  with the element's job id after, so the handler (or a re-run) will not submit it again.

Manifest contract (the worker resolves its element; see docs/submitter.md):
    line ``i`` (0-based) = ``AWS_BATCH_JOB_ARRAY_INDEX`` ``i``; each line is a JSON object
    ``{"index": i, "input": "s3://BUCKET/KEY", "output": "s3://BUCKET/<OUTPUT_PREFIX>",
    "etag": "...", "size": N}``. The array job gets the usual parameters, with ``input``
    pointing at the manifest (``.jsonl`` under ``_manifests/``) and ``output`` as usual.

Settings come from the same environment variables as the handler; every one can be given as
a flag (``--job-queue`` ... ``--idempotency-table``). Heavy imports stay inside functions.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:  # pragma: no cover
    from submitter.jobs import Clients, ObjectRef
    from submitter.settings import SubmitterSettings

#: More submittable objects than this -> array job(s) over a manifest.
DEFAULT_ARRAY_THRESHOLD = 1000
#: AWS Batch's limit on arrayProperties.size (and its minimum is 2).
MAX_ARRAY_SIZE = 10_000
MANIFEST_DIR = "_manifests/"
#: sysexits EX_CONFIG, as in batch_job/exit_codes.py (not imported: keeps the submitter standalone).
EXIT_CONFIG = 78
EXIT_FAILED = 1
#: How long an in-progress claim of one individually submitted object blocks others.
IN_PROGRESS_HOLD_MS = 5 * 60 * 1000

_FLAGS = (
    ("--job-queue", "job_queue", "JOB_QUEUE"),
    ("--job-definition", "job_definition", "JOB_DEFINITION"),
    ("--job-definition-long", "job_definition_long", "JOB_DEFINITION_LONG"),
    ("--long-job-min-bytes", "long_job_min_bytes", "LONG_JOB_MIN_BYTES"),
    ("--max-object-bytes", "max_object_bytes", "MAX_OBJECT_BYTES"),
    ("--input-prefix", "input_prefix", "INPUT_PREFIX"),
    ("--output-prefix", "output_prefix", "OUTPUT_PREFIX"),
    ("--idempotency-table", "idempotency_table", "IDEMPOTENCY_TABLE"),
)


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "submit",
        help="submit Batch jobs for audio already in S3 (backfill)",
        description="Backfill: list s3://BUCKET/PREFIX/, apply the submitter's skip rules and "
                    "idempotency, and submit one Batch job per object (array jobs over a manifest "
                    "for large listings). Settings default to the submitter's environment variables.",
    )
    p.add_argument("uri", metavar="s3://BUCKET/PREFIX/", help="bucket and prefix to list")
    p.add_argument("--array-threshold", type=int, default=DEFAULT_ARRAY_THRESHOLD,
                   help="above this many objects, submit array jobs over a manifest (default %(default)s)")
    p.add_argument("--dry-run", action="store_true", help="list and apply the rules, submit nothing")
    for flag, dest, env in _FLAGS:
        p.add_argument(flag, dest=dest, default=None, help=f"default: ${env}")
    p.set_defaults(func=run)


def parse_s3_uri(uri: str) -> tuple[str, str]:
    if not uri.startswith("s3://"):
        raise ValueError(f"expected s3://BUCKET/PREFIX, got {uri!r}")
    bucket, _, prefix = uri[5:].partition("/")
    if not bucket:
        raise ValueError(f"no bucket in {uri!r}")
    return bucket, prefix


def run(args: argparse.Namespace, *, clients: Clients | None = None, out: TextIO | None = None) -> int:
    """Entry point of ``whisper-batch submit``; ``clients`` is the same seam as the handler's."""
    from submitter.settings import SettingsError, SubmitterSettings

    out = out or sys.stdout
    try:
        bucket, prefix = parse_s3_uri(args.uri)
        settings = SubmitterSettings.from_env(**{dest: getattr(args, dest, None) for _, dest, _ in _FLAGS})
    except (ValueError, SettingsError) as exc:
        print(f"whisper-batch submit: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    return BulkSubmit(settings, clients, out=out).run(
        bucket, prefix, array_threshold=args.array_threshold, dry_run=args.dry_run,
    )


class BulkSubmit:
    def __init__(self, settings: SubmitterSettings, clients: Clients | None = None, *,
                 out: TextIO | None = None) -> None:
        from submitter.jobs import Clients, Submitter

        self.settings = settings
        self.clients = clients or Clients.create()
        self.submitter: Submitter = Submitter(settings, self.clients, source="bulk")
        # An in-progress record left by a crashed run must not block the objects for the whole
        # idempotency window: let it expire after a few minutes, as a Lambda invocation's would.
        self.submitter.register_lambda_context(_FixedDeadline(IN_PROGRESS_HOLD_MS))
        self.out = out or sys.stdout
        self.counts: Counter = Counter()
        self.skip_reasons: Counter = Counter()
        self.jobs = 0

    def say(self, status: str, uri: str, detail: str = "") -> None:
        print(f"{status:<10} {uri}" + (f"  {detail}" if detail else ""), file=self.out)

    # -- listing ---------------------------------------------------------------------------------
    def list_objects(self, bucket: str, prefix: str) -> Iterator[ObjectRef]:
        from submitter.jobs import ObjectRef, normalize_etag

        paginator = self.clients.s3.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
            for item in page.get("Contents", []):
                yield ObjectRef(bucket=bucket, key=item["Key"], etag=normalize_etag(item.get("ETag")),
                                size=int(item.get("Size", 0)))

    def candidates(self, bucket: str, prefix: str) -> list[ObjectRef]:
        from submitter import rules

        keep = []
        for obj in self.list_objects(bucket, prefix):
            self.counts["listed"] += 1
            reason = rules.skip_reason(obj.key, obj.size, self.settings)
            if reason is None:
                keep.append(obj)
            else:
                self._skipped(obj, reason)
        return keep

    def _skipped(self, obj: ObjectRef, reason: str, detail: str = "") -> None:
        self.counts["skipped"] += 1
        self.skip_reasons[reason] += 1
        self.say("skipped", obj.uri, f"reason={reason}" + (f" {detail}" if detail else ""))

    # -- submission --------------------------------------------------------------------------------
    def run(self, bucket: str, prefix: str, *, array_threshold: int = DEFAULT_ARRAY_THRESHOLD,
            dry_run: bool = False) -> int:
        todo = self.candidates(bucket, prefix)
        if dry_run:
            for obj in todo:
                self.say("would", obj.uri, f"definition={_definition(obj, self.settings)}")
            self.counts["would_submit"] = len(todo)
        elif len(todo) > array_threshold:
            self.submit_arrays(bucket, todo)
        else:
            for obj in todo:
                self.submit_one(obj)
        self.summary()
        return EXIT_FAILED if self.counts["failed"] else 0

    def submit_one(self, obj: ObjectRef) -> None:
        from submitter import rules

        try:
            outcome = self.submitter.submit(obj)
        except Exception as exc:  # noqa: BLE001 - reported per object, the run goes on
            self.counts["failed"] += 1
            self.say("failed", obj.uri, f"error={exc!r}")
            return
        if outcome.status == "duplicate":
            self.counts["duplicate"] += 1
            self.skip_reasons[rules.DUPLICATE] += 1
            self.say("duplicate", obj.uri, f"already submitted as job {outcome.job_name} ({outcome.job_id})")
        else:
            self.counts["submitted"] += 1
            self.jobs += 1
            self.say("submitted", obj.uri,
                     f"job={outcome.job_name} id={outcome.job_id} definition={outcome.job_definition}")

    def submit_arrays(self, bucket: str, todo: list[ObjectRef]) -> None:
        """Claim each object's idempotency record, then one array job per manifest chunk."""
        from submitter import rules

        claimed: list[ObjectRef] = []
        for obj in todo:
            try:
                held = self.submitter.claim(obj)
            except Exception as exc:  # noqa: BLE001
                self.counts["failed"] += 1
                self.say("failed", obj.uri, f"error={exc!r}")
                continue
            if held is None:
                claimed.append(obj)
            else:
                self.counts["duplicate"] += 1
                self.skip_reasons[rules.DUPLICATE] += 1
                job = held.get("jobId") or held.get("status", "in progress")
                self.say("duplicate", obj.uri, f"already submitted ({job})")

        groups: dict[str, list[ObjectRef]] = {}
        for obj in claimed:
            groups.setdefault(_definition(obj, self.settings), []).append(obj)
        for definition, objs in groups.items():
            for start in range(0, len(objs), MAX_ARRAY_SIZE):
                chunk = objs[start:start + MAX_ARRAY_SIZE]
                if len(chunk) == 1:  # Batch arrays have at least 2 elements
                    self.submitter.release(chunk[0], RuntimeError("submitted individually"))
                    self.submit_one(chunk[0])
                else:
                    self.submit_array(bucket, definition, chunk)

    def submit_array(self, bucket: str, definition: str, chunk: list[ObjectRef]) -> None:
        import json
        import time

        from submitter.jobs import JOB_TAGS, output_uri, readable_slug, short_hash

        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        digest = short_hash(bucket, definition, *(f"{o.key}\x00{o.etag}" for o in chunk), chars=10)
        name = f"{stamp}-{digest}"
        manifest_key = f"{self.settings.output_prefix}{MANIFEST_DIR}{name}.jsonl"
        output = output_uri(bucket, self.settings)
        lines = [
            json.dumps({"index": i, "input": o.uri, "output": output, "etag": o.etag, "size": o.size},
                       ensure_ascii=False, separators=(",", ":"))
            for i, o in enumerate(chunk)
        ]
        try:
            self.clients.s3.put_object(
                Bucket=bucket, Key=manifest_key, Body=("\n".join(lines) + "\n").encode("utf-8"),
                ContentType="application/x-ndjson",
                Metadata={"count": str(len(chunk)), "job-definition": definition},
            )
            response = self.clients.batch.submit_job(
                jobName=f"bulk-{readable_slug(name, 100)}",
                jobQueue=self.settings.job_queue,
                jobDefinition=definition,
                arrayProperties={"size": len(chunk)},
                parameters={"input": f"s3://{bucket}/{manifest_key}", "output": output},
                tags={**JOB_TAGS, "source": "bulk"},
                propagateTags=True,
            )
        except Exception as exc:  # noqa: BLE001 - give the claims back so a re-run can take them
            for obj in chunk:
                self.submitter.release(obj, exc)
                self.counts["failed"] += 1
                self.say("failed", obj.uri, f"error={exc!r}")
            return
        array_id = response["jobId"]
        job_name = response.get("jobName", f"bulk-{name}")
        self.jobs += 1
        for i, obj in enumerate(chunk):
            self.submitter.complete(obj, {"jobId": f"{array_id}:{i}", "jobName": job_name,
                                          "jobDefinition": definition, "arrayJobId": array_id,
                                          "manifest": f"s3://{bucket}/{manifest_key}"})
            self.counts["submitted"] += 1
            self.say("queued", obj.uri, f"array={job_name}[{i}] id={array_id}:{i}")
        print(f"array job {job_name} ({array_id}): {len(chunk)} objects, definition={definition}, "
              f"manifest=s3://{bucket}/{manifest_key}", file=self.out)

    def summary(self) -> None:
        c = self.counts
        reasons = ", ".join(f"{r}={n}" for r, n in sorted(self.skip_reasons.items())) or "-"
        verb = "would submit" if "would_submit" in c else "submitted"
        n_sub = c["would_submit"] if "would_submit" in c else c["submitted"]
        print(f"summary: {c['listed']} listed, {n_sub} {verb} in {self.jobs} job(s), "
              f"{c['skipped'] + c['duplicate']} skipped ({reasons}), {c['failed']} failed", file=self.out)


class _FixedDeadline:
    """Stands in for the Lambda context: powertools asks it for the remaining time."""

    def __init__(self, millis: int) -> None:
        self.millis = millis

    def get_remaining_time_in_millis(self) -> int:
        return self.millis


def _definition(obj: ObjectRef, settings: SubmitterSettings) -> str:
    from submitter.jobs import job_definition_for

    return job_definition_for(obj.size, settings)
