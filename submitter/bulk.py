"""``whisper-batch submit s3://BUCKET/PREFIX/``: backfill objects that already exist.

Lists the prefix (paginated), applies the same skip rules as the Lambda handler
(:mod:`submitter.rules`), the same idempotency records and the same packs
(:mod:`submitter.jobs`, :mod:`submitter.packs`), and prints one line per object
(``submitted`` / ``queued`` / ``duplicate`` / ``skipped`` / ``failed`` / ``would``), one line per
pack or array job, and a summary.

* Up to ``--array-threshold`` (default 1,000) submittable objects: one job per pack, exactly as
  the handler submits them.
* More: the packs become the elements of array jobs (at most 10,000 elements each; standard and
  long-timeout packs in separate arrays; a lone pack left over is a plain job). One manifest per
  array, whose lines carry ``index`` = the element (pack) they belong to. Each object's
  idempotency record is claimed before the array job is submitted and completed with its
  element's job id (``<array job id>:<index>``) after, so the handler (or a re-run) will not
  submit it again; a failed submit releases the claims.

With ``--failed-only``, only objects whose error marker says a retryable or fixed failure are
submitted again (:mod:`submitter.failed`); the others print ``skipped`` with the reason, and the
COMPLETED idempotency record of each object run again is deleted first when it names the job that
failed, so the claim is not a ``duplicate``; one naming a later job (already submitted again,
not run yet) leaves the object ``skipped`` (``already_resubmitted``).

The manifest contract is the handler's (:mod:`submitter.manifest`, docs/submitter.md).

Settings come from the same environment variables as the handler; every one can be given as
a flag (``--job-queue`` ... ``--pack-parallelism``). Heavy imports stay inside functions.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:  # pragma: no cover
    from submitter.jobs import Clients, Outcome
    from submitter.objects import ObjectRef
    from submitter.packs import Pack
    from submitter.settings import SubmitterSettings

#: More submittable objects than this -> array job(s) over a manifest.
DEFAULT_ARRAY_THRESHOLD = 1000
#: AWS Batch's limit on arrayProperties.size (and its minimum is 2).
MAX_ARRAY_SIZE = 10_000
#: sysexits EX_CONFIG, as in batch_job/exit_codes.py (not imported: keeps the submitter standalone).
EXIT_CONFIG = 78
EXIT_FAILED = 1

_FLAGS = (
    ("--job-queue", "job_queue", "JOB_QUEUE"),
    ("--job-definition", "job_definition", "JOB_DEFINITION"),
    ("--job-definition-long", "job_definition_long", "JOB_DEFINITION_LONG"),
    ("--long-job-min-bytes", "long_job_min_bytes", "LONG_JOB_MIN_BYTES"),
    ("--max-object-bytes", "max_object_bytes", "MAX_OBJECT_BYTES"),
    ("--input-prefix", "input_prefix", "INPUT_PREFIX"),
    ("--output-prefix", "output_prefix", "OUTPUT_PREFIX"),
    ("--idempotency-table", "idempotency_table", "IDEMPOTENCY_TABLE"),
    ("--pack-max-objects", "pack_max_objects", "PACK_MAX_OBJECTS"),
    ("--pack-max-bytes", "pack_max_bytes", "PACK_MAX_BYTES"),
    ("--pack-max-audio-seconds", "pack_max_audio_seconds", "PACK_MAX_AUDIO_SECONDS"),
    ("--pack-parallelism", "pack_parallelism", "PACK_PARALLELISM"),
)


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "submit",
        help="submit Batch jobs for audio already in S3 (backfill)",
        description="Backfill: list s3://BUCKET/PREFIX/, apply the submitter's skip rules and "
                    "idempotency, and submit one Batch job per pack of objects (array jobs of packs "
                    "for large listings). Settings default to the submitter's environment variables.",
    )
    p.add_argument("uri", metavar="s3://BUCKET/PREFIX/", help="bucket and prefix to list")
    p.add_argument("--array-threshold", type=int, default=DEFAULT_ARRAY_THRESHOLD,
                   help="above this many objects, submit array jobs whose elements are packs (default %(default)s)")
    p.add_argument("--dry-run", action="store_true", help="list and apply the rules, submit nothing")
    p.add_argument("--failed-only", action="store_true",
                   help="submit only objects whose error marker says a retryable (exit 75/70) or fixed "
                        "(exit 78) failure; skip done, bad-input (exit 65) and never-failed objects")
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
        failed_only=getattr(args, "failed_only", False),
    )


class BulkSubmit:
    """One backfill run: lists, filters, packs, submits and prints (see the module docstring)."""

    def __init__(self, settings: SubmitterSettings, clients: Clients | None = None, *,
                 out: TextIO | None = None) -> None:
        from submitter.jobs import Clients, Submitter

        self.settings = settings
        self.clients = clients or Clients.create()
        # No Lambda context: claims hold for jobs.DEFAULT_CLAIM_HOLD_SECONDS (a crashed run
        # blocks its objects that long at most).
        self.submitter: Submitter = Submitter(settings, self.clients, source="bulk")
        self.out = out or sys.stdout
        self.counts: Counter = Counter()
        self.skip_reasons: Counter = Counter()
        self.redo: Counter = Counter()  # --failed-only: "<kind>:<failure>" of the objects run again
        self.jobs = 0

    def say(self, status: str, uri: str, detail: str = "") -> None:
        print(f"{status:<10} {uri}" + (f"  {detail}" if detail else ""), file=self.out)

    # -- listing ---------------------------------------------------------------------------------
    def list_objects(self, bucket: str, prefix: str) -> Iterator[ObjectRef]:
        from submitter.objects import ObjectRef, normalize_etag

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
            dry_run: bool = False, failed_only: bool = False) -> int:
        todo = self.candidates(bucket, prefix)
        if failed_only:
            todo = self.failed_ones(bucket, prefix, todo, dry_run=dry_run)
        if dry_run:
            self.dry_run(todo)
        elif len(todo) > array_threshold:
            self.submit_arrays(todo)
        else:
            self.report_jobs(self.submitter.submit_packs(todo))
        self.summary()
        return EXIT_FAILED if self.counts["failed"] else 0

    def failed_ones(self, bucket: str, prefix: str, todo: list[ObjectRef], *, dry_run: bool) -> list[ObjectRef]:
        """``--failed-only``: the objects whose markers say to run them again, their COMPLETED
        idempotency records deleted (not in a dry run); every other object is ``skipped``."""
        from submitter.failed import ALREADY_RESUBMITTED, MarkerIndex
        from submitter.jobs import FAILED, Outcome, describe_error

        again = []
        for obj, verdict in MarkerIndex(self.clients.s3, bucket, self.settings.output_prefix, prefix).verdicts(todo):
            if not verdict.redo:
                self._skipped(obj, verdict.why, verdict.detail())
                continue
            if not dry_run:
                try:
                    later = self.submitter.reopen(obj, verdict.job_id)
                except Exception as exc:  # noqa: BLE001 - DynamoDB down: this object is retried
                    self.report(Outcome(obj, FAILED, error=describe_error(exc)))
                    continue
                if later is not None:
                    self._skipped(obj, ALREADY_RESUBMITTED, f"job={later.get('jobName')} id={later.get('jobId')}")
                    continue
            self.redo[f"{verdict.why}:{verdict.failure}"] += 1
            again.append(obj)
        return again

    def dry_run(self, todo: list[ObjectRef]) -> None:
        """Print the packs the objects would form; claim and submit nothing."""
        from submitter.packs import make_packs

        packs = make_packs(todo, self.settings)
        for number, pack in enumerate(packs):
            for obj in pack.objects:
                self.say("would", obj.uri, f"definition={pack.job_definition} pack={number}")
        self.counts["would_submit"] = len(todo)
        self.jobs = len(packs)

    def submit_arrays(self, todo: list[ObjectRef]) -> None:
        """Claim every object, pack the claimed ones, then one array job per (definition, up to
        10,000 packs); a lone pack is a plain job."""
        from submitter.packs import make_packs

        claimed: list[ObjectRef] = []
        for obj in todo:
            outcome = self.submitter.try_claim(obj)
            if outcome is None:
                claimed.append(obj)
            else:
                self.report(outcome)
        groups: dict[tuple[str, str], list[Pack]] = {}
        for pack in make_packs(claimed, self.settings):
            groups.setdefault((pack.bucket, pack.job_definition), []).append(pack)
        for packs in groups.values():
            for start in range(0, len(packs), MAX_ARRAY_SIZE):
                chunk = packs[start:start + MAX_ARRAY_SIZE]
                if len(chunk) == 1:  # Batch arrays have at least 2 elements
                    self.report_jobs(self.submitter.submit_pack(chunk[0]))
                else:
                    self.report_array(chunk, self.submitter.submit_array(chunk))

    # -- output ------------------------------------------------------------------------------------
    def report(self, outcome: Outcome) -> None:
        """One object's line (and its counts)."""
        from submitter import rules

        uri = outcome.obj.uri
        if outcome.status == "duplicate":
            self.counts["duplicate"] += 1
            self.skip_reasons[rules.DUPLICATE] += 1
            self.say("duplicate", uri, f"already submitted as job {outcome.job_name} ({outcome.job_id})")
        elif outcome.status == "failed":
            self.counts["failed"] += 1
            self.say("failed", uri, f"error={outcome.error}")
        elif outcome.job_id and ":" in outcome.job_id:  # an array element
            self.counts["submitted"] += 1
            index = outcome.job_id.rsplit(":", 1)[1]
            self.say("queued", uri, f"array={outcome.job_name}[{index}] id={outcome.job_id}")
        else:
            self.counts["submitted"] += 1
            pack = f" manifest={outcome.manifest}" if outcome.manifest else ""
            self.say("submitted", uri, f"job={outcome.job_name} id={outcome.job_id} "
                                       f"definition={outcome.job_definition}{pack}")

    def report_jobs(self, outcomes: list[Outcome]) -> None:
        """The objects' lines, then one line per pack job of two or more objects."""
        packs: dict[str, list[Outcome]] = {}
        for outcome in outcomes:
            self.report(outcome)
            if outcome.status == "submitted":
                packs.setdefault(str(outcome.job_id), []).append(outcome)
        self.jobs += len(packs)
        for job_id, members in packs.items():
            if members[0].manifest:
                print(f"pack job {members[0].job_name} ({job_id}): {len(members)} objects, "
                      f"definition={members[0].job_definition}, manifest={members[0].manifest}", file=self.out)

    def report_array(self, packs: list[Pack], outcomes: list[Outcome]) -> None:
        """The objects' lines, then the array job's line (when it was submitted)."""
        for outcome in outcomes:
            self.report(outcome)
        done = outcomes[0]
        if done.status == "submitted":
            self.jobs += 1
            array_id = str(done.job_id).rsplit(":", 1)[0]
            print(f"array job {done.job_name} ({array_id}): {len(packs)} packs, {len(outcomes)} objects, "
                  f"definition={done.job_definition}, manifest={done.manifest}", file=self.out)

    def summary(self) -> None:
        c = self.counts
        reasons = ", ".join(f"{r}={n}" for r, n in sorted(self.skip_reasons.items())) or "-"
        verb = "would submit" if "would_submit" in c else "submitted"
        n_sub = c["would_submit"] if "would_submit" in c else c["submitted"]
        print(f"summary: {c['listed']} listed, {n_sub} {verb} in {self.jobs} job(s), "
              f"{c['skipped'] + c['duplicate']} skipped ({reasons}), {c['failed']} failed", file=self.out)
        if self.redo:
            again = ", ".join(f"{k}={n}" for k, n in sorted(self.redo.items()))
            print(f"failed-only: {sum(self.redo.values())} run again ({again})", file=self.out)
