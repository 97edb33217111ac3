"""The ``status`` subcommand: argument parsing and the printed report."""
from __future__ import annotations

import json
import sys
from datetime import datetime, timezone
from typing import Any

from batch_job import s3io
from batch_job.status.reader import DEFAULT_THREADS, list_keys, read_markers, s3_client, stderr_progress
from batch_job.status.records import EXAMPLES_PER_REASON, summarize


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("status", help="progress, failures and cost from the markers under s3://BUCKET/PREFIX/",
                              description="Reads completion (.json) and error (.error.json) markers, not logs.")
    p.add_argument("output", help="s3://BUCKET/PREFIX/ (the jobs' output prefix)")
    p.add_argument("--input", help="s3://BUCKET/PREFIX/ where inputs live; with it, pending = inputs without a marker")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--failed", action="store_true", help="list every failed key")
    p.add_argument("--since", help="only markers written at or after this ISO time (e.g. 2026-12-06T10:00Z)")
    p.add_argument("--progress", action="store_true", help="show the progress bar even when stderr is not a TTY")
    p.add_argument("--threads", type=int, default=DEFAULT_THREADS)
    p.add_argument("--endpoint-url", help="S3 endpoint (local mode's server), default $AWS_ENDPOINT_URL")
    p.set_defaults(func=_command)


def _since(text: str | None) -> datetime | None:
    if not text:
        return None
    t = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


def _progress(args: Any):
    """The bar only on a TTY or with --progress, never with --json."""
    if args.json or not (args.progress or sys.stderr.isatty()):
        return None
    return stderr_progress()


def _command(args: Any) -> int:
    try:
        out = s3io.S3Uri.parse(args.output, prefix=True)
        inp = s3io.S3Uri.parse(args.input, prefix=True) if args.input else None
        since = _since(args.since)
    except ValueError as exc:
        print(f"whisper-batch status: {exc}", file=sys.stderr)
        return 2
    client = s3_client(args.threads, args.endpoint_url)
    try:
        records = read_markers(client, out.bucket, out.key, threads=args.threads, since=since,
                               progress=_progress(args))
        inputs = None
        if inp is not None:
            inputs = {k for k in list_keys(client, inp.bucket, inp.key)
                      if inp.bucket != out.bucket or not k.startswith(out.key)}
    except Exception as exc:  # no such bucket, denied, endpoint down
        print(f"\nwhisper-batch status: cannot read {out}: {exc}", file=sys.stderr)
        return 2
    summary = summarize(records, inputs)
    report = summary.as_json(all_failed=args.failed)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(file=sys.stderr)
    print(f"done {summary.done}  failed {summary.failed}  warned {summary.warned}  "
          f"pending {'?' if summary.pending is None else summary.pending}")
    print(f"audio hours {report['audio_hours']}  RTF median {summary.rtf_median}  p95 {summary.rtf_p95}  "
          f"cost ${report['cost_usd']} ({summary.objects_without_cost} objects without a price)")
    for reason, block in report["failures"].items():
        more = "" if args.failed or block["count"] <= EXAMPLES_PER_REASON else " ..."
        print(f"  {reason}: {block['count']}  e.g. {', '.join(block['examples'])}{more}")
    return 0
