"""``whisper-batch serve``: settings and flags in, uvicorn running the app until SIGTERM.

SageMaker starts the image as ``docker run IMAGE serve``; the image's entry point is
``whisper-batch``, so this is what answers. The port is ``$SAGEMAKER_BIND_TO_PORT`` (8080 when
unset) unless ``--port`` says otherwise. On SIGTERM uvicorn stops accepting connections and waits
up to ``serve_drain_seconds`` for the requests in flight, which the scheduler keeps decoding; then
the scheduler stops. A model that fails to load stops the server with the exit code the Batch job
would give that error (78 for a model that cannot load).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

from batch_job import exit_codes
from batch_job.errors import ConfigError
from batch_job.settings import Settings, serve_port
from batch_job.speakers.options import SpeakerOptions, settings_from_arguments
from batch_job.speakers.options import add_arguments as add_speaker_arguments


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "serve",
        help="serve SageMaker endpoints: GET /ping, POST /invocations (docs/serving.md)",
        description="Serve transcription over HTTP with SageMaker's inference-container contract: real-time, "
                    "asynchronous and serverless endpoints and Batch Transform. Concurrent requests share batches.",
    )
    p.add_argument("--port", type=int, help="port (default: $SAGEMAKER_BIND_TO_PORT, else 8080)")
    p.add_argument("--host", default="0.0.0.0", help="address to bind (default: 0.0.0.0, as SageMaker needs)")
    p.add_argument("--model", help="tiny.en (default), base, a checkpoint or CTranslate2 directory, or a cached hub id")
    p.add_argument("--device", choices=("auto", "cpu", "cuda", "neuron"), help="default: auto")
    p.add_argument("--batch-size", type=int, help="windows per batch (default: 8)")
    p.add_argument("--threads", type=int, help="torch threads (default: all available cores)")
    p.add_argument("--word-timestamps", action="store_true", default=None,
                   help="load the alignment output: requests get words by default and may turn them off")
    p.add_argument("--max-queue", type=int, help="requests held at once; more get 503 + Retry-After (default: 64)")
    p.add_argument("--batch-wait-ms", type=float,
                   help="an idle engine waits this long for more requests to share a batch (default: 10)")
    p.add_argument("--max-body-mb", type=float, help="largest request body in MB (default: 100)")
    add_speaker_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from batch_job.serve.http import create_app
    except ImportError as exc:
        print(f"error: serving needs the 'serve' extra ({exc.name} is missing): pip install -e '.[serve]'", file=sys.stderr)
        return 2
    from batch_job.job.log import JsonLog

    try:
        settings = Settings.from_env().replace(
            model=args.model, device=args.device, batch_size=args.batch_size, threads=args.threads,
            word_timestamps=args.word_timestamps, serve_max_queue=args.max_queue,
            serve_batch_wait_ms=args.batch_wait_ms, serve_max_body_mb=args.max_body_mb, **settings_from_arguments(args))
        check(settings)
        port = args.port if args.port is not None else serve_port()
    except (ConfigError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    log = JsonLog(service="serve")
    app = create_app(settings, log=log)
    config = uvicorn.Config(app, host=args.host, port=port, log_level="warning", access_log=False, lifespan="on",
                            timeout_graceful_shutdown=int(settings.serve_drain_seconds))
    server = uvicorn.Server(config)
    state = app.state.serving

    def stop(exc: BaseException) -> None:
        server.should_exit = True

    state.on_load_failed = stop
    # uvicorn catches SIGTERM while it serves, drains, then raises the signal again under the
    # handler that was there before it: this one, so that a drained server exits 0, not 143.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    log("start", host=args.host, port=port, model=settings.model, device=settings.device, pid=os.getpid(),
        max_queue=settings.serve_max_queue, batch_wait_ms=settings.serve_batch_wait_ms)
    server.run()
    if state.load_error is not None:
        return exit_codes.for_error(state.load_error) if isinstance(state.load_error, Exception) else exit_codes.INTERNAL
    return exit_codes.OK


def check(settings: Settings) -> None:
    """Refuse serving settings that cannot work, naming the setting."""
    if settings.batch_size < 1:
        raise ConfigError("--batch-size must be at least 1")
    if settings.serve_max_queue < 1:
        raise ConfigError("--max-queue (WHISPER_BATCH_SERVE_MAX_QUEUE) must be at least 1")
    if settings.serve_batch_wait_ms < 0:
        raise ConfigError("--batch-wait-ms (WHISPER_BATCH_SERVE_BATCH_WAIT_MS) must not be negative")
    if settings.serve_max_body_mb <= 0:
        raise ConfigError("--max-body-mb (WHISPER_BATCH_SERVE_MAX_BODY_MB) must be positive")
    SpeakerOptions.from_settings(settings)
