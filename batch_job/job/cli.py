"""``whisper-batch run-job``: the AWS Batch entry point (parameters in, exit code out)."""

from __future__ import annotations

import argparse
import os
import signal
import threading
from typing import Any

from batch_job import exit_codes, s3io
from batch_job.errors import WhisperBatchError
from batch_job.job.context import JobContext
from batch_job.job.keys import DEFAULT_OUTPUT_PREFIX
from batch_job.job.log import JsonLog
from batch_job.job.manifest import is_manifest_uri, read_pack
from batch_job.job.pack import run_job, run_pack
from batch_job.settings import Settings


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "run-job",
        help="AWS Batch entry point: transcribe S3 objects (one, or a pack manifest) to "
             "s3://.../PREFIX/<key>.{json,txt,srt,vtt}",
        description="Transcribe one S3 object, or every object of a pack manifest with one loaded model. "
                    "Exit codes: 0 done/already done, 65 bad input, 75 transient (S3, SIGTERM; retry), "
                    "78 config/model error, 70 unexpected (retry).",
    )
    p.add_argument("--input", help="s3://BUCKET/KEY, or a pack manifest s3://.../_manifests/NAME.jsonl "
                                   "(default $WHISPER_BATCH_INPUT_URI)")
    p.add_argument("--output", help=f"s3://BUCKET/PREFIX/ (default $WHISPER_BATCH_OUTPUT_URI, else the manifest "
                                    f"line's output, else s3://<input bucket>/{DEFAULT_OUTPUT_PREFIX})")
    p.add_argument("--manifest", help="pack manifest (JSON lines; with $AWS_BATCH_JOB_ARRAY_INDEX, the lines of "
                                      "that element; default $WHISPER_BATCH_MANIFEST_URI)")
    p.add_argument("--model", help="model name or path in the image (default $WHISPER_BATCH_MODEL)")
    p.add_argument("--language", help="language code, e.g. en (default: detect)")
    p.add_argument("--task", choices=("transcribe", "translate"))
    p.add_argument("--formats", help="comma-separated subset of json,txt,srt,vtt (json is always written)")
    p.set_defaults(func=_command)


def _pre_job_signal(signum: int, frame: Any) -> None:
    # Before the job installs its handlers nothing has been written yet: just exit retryable.
    # (The image runs whisper-batch as PID 1, which would otherwise ignore SIGTERM entirely.)
    raise SystemExit(exit_codes.TRANSIENT)


def _command(args: argparse.Namespace) -> int:
    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {sig: signal.signal(sig, _pre_job_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return _run_command(args)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _run_command(args: argparse.Namespace) -> int:
    context = JobContext.from_env()
    log = JsonLog(job_id=context.job_id, attempt=context.attempt)
    try:
        settings = Settings.for_batch_job().replace(model=args.model, language=args.language, task=args.task,
                                                    formats=args.formats, input_uri=args.input,
                                                    output_uri=args.output, manifest_uri=args.manifest)
    except (ValueError, TypeError) as exc:
        log("failed", level="error", reason="config_error", message=str(exc), exit_code=exit_codes.CONFIG_ERROR)
        return exit_codes.CONFIG_ERROR
    # Weights and graphs come from the image; never reach for the hub at job start.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    input_uri, output_uri = settings.input_uri, settings.output_uri or None
    manifest = settings.manifest_uri or (input_uri if is_manifest_uri(input_uri) else "")
    if manifest:
        s3 = s3io.aws_client("s3", settings.s3_max_attempts)
        try:
            entries = read_pack(s3, manifest, context.array_index)
        except WhisperBatchError as exc:
            code = exit_codes.for_error(exc)
            log("failed", level="error", reason=exc.reason, message=exc.message, exit_code=code)
            return code
        log("manifest", manifest=manifest, index=context.array_index, objects=len(entries))
        pairs = [(e.input_uri, output_uri or e.output_uri) for e in entries]
        return run_pack(pairs, settings=settings, manifest=manifest, s3=s3, context=context, log=log).exit_code
    if not input_uri:
        log("failed", level="error", reason="config_error", exit_code=exit_codes.CONFIG_ERROR,
            message="no input: pass --input s3://BUCKET/KEY (or a pack manifest s3://.../NAME.jsonl)")
        return exit_codes.CONFIG_ERROR
    return run_job(input_uri, output_uri, settings=settings, context=context, log=log).exit_code
