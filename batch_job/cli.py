"""``whisper-batch`` command line: one entry point, one subcommand per job.

Each subcommand lives in the module that does the work and registers itself through a
``register(subparsers)`` function; this file only wires them together. Those modules keep
their heavy imports (torch, transformers, boto3) inside the command functions so that
``whisper-batch --help`` is instant.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence

#: Modules that contribute a subcommand, in --help order.
SUBCOMMAND_MODULES = (
    "batch_job.cli_transcribe",  # transcribe FILE...
    "batch_job.job",             # run-job --input s3://...
    "submitter.bulk",            # submit s3://bucket/prefix/
    "batch_job.engine.neuron.compile",  # compile --model ... --out DIR
    "batch_job.local.cli",       # local [--once FILE...]
    "batch_job.serve",           # serve [--port P]: SageMaker endpoints
    "batch_job.status",          # status s3://bucket/prefix/: markers -> progress, failures, cost
)
#: Subcommands whose process ends as soon as the command returns, without interpreter teardown.
QUICK_EXIT_COMMANDS = frozenset({"run-job"})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="whisper-batch",
        description="Transcribe audio with Whisper: locally, or as an AWS Batch job on Inferentia2.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def entry_point() -> None:
    """The ``whisper-batch`` program (console script, image ENTRYPOINT, ``python -m batch_job.cli``).

    After ``run-job`` every result is on S3 and every file is closed, so the process ends with
    ``os._exit`` once logs and stdio are flushed: tearing the interpreter down (freeing the model,
    torch's thread pools, module teardown) would only delay the job's end, and the next job's
    start, by a fraction of a second (``benchmarks/many_files.py`` reports the stages of a run).
    Every other command exits normally.
    """
    args = sys.argv[1:]
    code = main(args)
    if args[:1] and args[0] in QUICK_EXIT_COMMANDS:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":  # pragma: no cover
    entry_point()
