"""``whisper-batch local``: the deployed pipeline on one machine, on loopback stand-ins.

    whisper-batch local [--data-dir DIR] [--workers N] [--port P]     # serve until Ctrl-C
    whisper-batch local --once FILE...                                # transcribe, print, exit

:class:`LocalMode` wires the pieces (docs/local.md): ``rclone serve s3`` over DIR, moto_server's
DynamoDB for the idempotency table, the SAME ``submitter.app.handler`` (its environment set as
the stack sets it, its Batch client replaced through ``submitter.app.configure``) fed by
:class:`~batch_job.local.watcher.Watcher`, and :class:`~batch_job.local.executor.LocalBatch`
running ``whisper-batch run-job`` processes.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from batch_job.errors import ConfigError
from batch_job.local import (
    ACCESS_KEY_ID,
    DEFAULT_BUCKET,
    DEFAULT_DATA_DIR,
    DEFAULT_INPUT_PREFIX,
    DEFAULT_OUTPUT_PREFIX,
    REGION,
    SECRET_ACCESS_KEY,
    state_dir,
)
from batch_job.local.executor import default_workers
from batch_job.local.progress import Progress
from batch_job.speakers.options import SpeakerOptions, settings_from_arguments
from batch_job.speakers.options import add_arguments as add_speaker_arguments

#: Submitter environment as the stack sets it (cloudformation/template.yaml defaults).
LONG_JOB_MIN_BYTES = 209_715_200
MAX_OBJECT_BYTES = 2_147_483_648
SERVICE = "whisper-batch"


class LocalError(RuntimeError):
    """Local mode cannot start (message for the user)."""


@dataclass
class LambdaContext:
    """What the Lambda runtime passes the handler (the fields powertools reads)."""

    function_name: str = "whisper-batch-submitter-local"
    function_version: str = "$LATEST"
    memory_limit_in_mb: int = 256
    invoked_function_arn: str = f"arn:aws:lambda:{REGION}:000000000000:function:whisper-batch-submitter-local"
    aws_request_id: str = field(default_factory=lambda: __import__("uuid").uuid4().__str__())
    timeout_ms: int = 120_000  # the stack's submitter Timeout (cloudformation/template.yaml)
    _started: float = field(default_factory=time.monotonic)

    def get_remaining_time_in_millis(self) -> int:
        return max(0, int(self.timeout_ms - (time.monotonic() - self._started) * 1000))


class LocalMode:
    """Everything ``whisper-batch local`` runs; usable in-process (tests) or from the CLI."""

    def __init__(self, data_dir: str | Path = DEFAULT_DATA_DIR, *, workers: int | None = None,
                 port: int | None = None, bucket: str = DEFAULT_BUCKET, input_prefix: str = DEFAULT_INPUT_PREFIX,
                 output_prefix: str = DEFAULT_OUTPUT_PREFIX, poll_interval: float = 1.0, settle: float = 1.0,
                 pack_max_objects: int | None = None, out: IO[str] | None = None) -> None:
        self.data_dir = Path(data_dir).expanduser().resolve()
        self.workers = workers or default_workers()
        self.port = port
        self.bucket = bucket
        self.input_prefix = input_prefix
        self.output_prefix = output_prefix
        self.poll_interval = poll_interval
        self.settle = settle
        #: objects per job (None: the stack's default; 1: one job per file, no packs)
        self.pack_max_objects = pack_max_objects
        self.out = out or sys.stdout
        self._print_lock = threading.Lock()
        self.s3_server = None
        self.dynamo_server = None
        self.executor = None
        self.watcher = None
        self.s3 = None
        self._lock_file = None
        self._submitter_stream = None
        self.progress: Progress | None = None
        #: input key -> ETag last handed to the submitter
        self.delivered: dict[str, str] = {}
        #: jobs found queued at start (from the previous run)
        self.resumed = 0

    # ---------------------------------------------------------------- output
    def say(self, what: str, key: str, detail: str = "") -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {what:<9} {key}" + (f"  {detail}" if detail else "")
        with self._print_lock:
            try:
                print(line, file=self.out, flush=True)
            except (OSError, ValueError):
                pass

    @property
    def endpoint_url(self) -> str:
        return self.s3_server.endpoint_url if self.s3_server else ""

    def client_env(self) -> dict[str, str]:
        """Environment for any AWS client talking to the embedded endpoint."""
        return {"AWS_ACCESS_KEY_ID": ACCESS_KEY_ID, "AWS_SECRET_ACCESS_KEY": SECRET_ACCESS_KEY,
                "AWS_DEFAULT_REGION": REGION}

    def banner(self) -> str:
        url = self.endpoint_url
        audio_dir = self.data_dir / self.bucket / self.input_prefix
        out_dir = self.data_dir / self.bucket / self.output_prefix
        env = " ".join(f"{k}={v}" for k, v in self.client_env().items())
        return "\n".join([
            f"whisper-batch local: S3 endpoint {url}  (bucket {self.bucket}, data in {self.data_dir})",
            f"  credentials:  export {env}",
            f"  drop a file:  aws s3 cp FILE s3://{self.bucket}/{self.input_prefix} --endpoint-url {url}",
            f"            or: cp FILE {audio_dir}/",
            f"  results:      s3://{self.bucket}/{self.output_prefix}{self.input_prefix}<name>.{{txt,srt,vtt,json}}"
            f"  ({out_dir}/)",
            f"  workers:      {self.workers} job(s) at once; logs in {state_dir(self.data_dir) / 'logs'}",
        ])

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> LocalMode:
        from batch_job.local.dynamo import DynamoServer
        from batch_job.local.executor import LocalBatch, default_job_definitions
        from batch_job.local.s3server import S3Server
        from batch_job.local.watcher import Watcher

        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._acquire_lock()
        try:
            self.s3_server = S3Server(self.data_dir, self.port, bucket=self.bucket)
            self.dynamo_server = DynamoServer(self.data_dir)
            self.s3_server.launch()      # both servers start in parallel ...
            self.dynamo_server.launch()
            handler_app = self._import_submitter()  # ... while powertools imports
            self.s3_server.wait_ready()
            self.dynamo_server.wait_ready()
            self.s3 = self._s3_client()

            output_uri = f"s3://{self.bucket}/{self.output_prefix}"
            self.progress = Progress(self.s3, self.bucket, self.output_prefix, self.say).start()
            self.executor = LocalBatch(self.data_dir, workers=self.workers, env=self._job_env(),
                                       job_definitions=default_job_definitions(output_uri),
                                       on_event=self.progress.on_job_event)
            self._configure_submitter(handler_app)
            self.watcher = Watcher(self.s3, self.bucket, self.input_prefix, state_dir(self.data_dir) / "watcher.json",
                                   self._deliver, interval=self.poll_interval, settle=self.settle,
                                   on_dead_letter=self._on_dead_letter, on_delivered=self._on_delivered,
                                   on_error=lambda msg: self.say("warning", "-", msg))
            self.resumed = self.executor.start()
            self.watcher.start()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> int:
        """Watcher off, running jobs interrupted (kept queued), servers off. Returns jobs still queued."""
        kept = 0
        if self.watcher is not None:
            self.watcher.stop()
            self.watcher = None
        if self.executor is not None:
            kept = self.executor.stop()
            self.executor.close()
            self.executor = None
        if self.progress is not None:
            self.progress.stop()
        for server in (self.dynamo_server, self.s3_server):
            if server is not None:
                server.stop()
        self.dynamo_server = self.s3_server = None
        self._restore_submitter_log()
        self._release_lock()
        return kept

    def __enter__(self) -> LocalMode:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def _acquire_lock(self) -> None:
        import fcntl

        path = state_dir(self.data_dir) / "lock"
        handle = open(path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            raise LocalError(f"another 'whisper-batch local' is running on {self.data_dir}; "
                             f"drop files into it (or use another --data-dir)") from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        self._lock_file = handle

    def _release_lock(self) -> None:
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    # ---------------------------------------------------------------- clients and environments
    def _s3_client(self):
        import boto3
        from botocore.config import Config

        return boto3.session.Session().client(
            "s3", endpoint_url=self.endpoint_url, region_name=REGION,
            aws_access_key_id=ACCESS_KEY_ID, aws_secret_access_key=SECRET_ACCESS_KEY,
            config=Config(retries={"mode": "standard", "max_attempts": 5}, connect_timeout=5, read_timeout=60,
                          s3={"addressing_style": "path"}),
        )

    def _job_env(self) -> dict[str, str]:
        """The job container's environment: the embedded endpoint instead of AWS."""
        env = {k: v for k, v in os.environ.items()
               if not (k.startswith("AWS_") or k in ("JOB_QUEUE", "JOB_DEFINITION", "JOB_DEFINITION_LONG"))}
        missing = str(state_dir(self.data_dir) / "no-aws-config")  # no ~/.aws profile can redirect the job
        env.update(self.client_env())
        env.update({
            "AWS_ENDPOINT_URL": self.endpoint_url, "AWS_ENDPOINT_URL_S3": self.endpoint_url,
            "AWS_CONFIG_FILE": missing, "AWS_SHARED_CREDENTIALS_FILE": missing,
            "AWS_EC2_METADATA_DISABLED": "true", "PYTHONUNBUFFERED": "1",
        })
        return env

    def _submitter_env(self) -> dict[str, str]:
        from batch_job.local.dynamo import DEFAULT_TABLE
        from batch_job.local.executor import DEFAULT_JOB_DEFINITION, DEFAULT_JOB_DEFINITION_LONG, DEFAULT_QUEUE

        return {
            "JOB_QUEUE": DEFAULT_QUEUE, "JOB_DEFINITION": DEFAULT_JOB_DEFINITION,
            "JOB_DEFINITION_LONG": DEFAULT_JOB_DEFINITION_LONG, "LONG_JOB_MIN_BYTES": str(LONG_JOB_MIN_BYTES),
            "MAX_OBJECT_BYTES": str(MAX_OBJECT_BYTES), "INPUT_PREFIX": self.input_prefix,
            "OUTPUT_PREFIX": self.output_prefix, "IDEMPOTENCY_TABLE": DEFAULT_TABLE,
            # Packs spread over every worker, as the stack spreads them over an instance's cores.
            "PACK_PARALLELISM": str(self.workers),
            **({"PACK_MAX_OBJECTS": str(self.pack_max_objects)} if self.pack_max_objects else {}),
        }

    def _import_submitter(self):
        """``submitter.app`` with the environment the stack gives the Lambda (read at import)."""
        os.environ.update(self._submitter_env())
        for key, value in {"POWERTOOLS_SERVICE_NAME": SERVICE, "POWERTOOLS_METRICS_NAMESPACE": "WhisperBatch",
                           "POWERTOOLS_TRACE_DISABLED": "1", "POWERTOOLS_METRICS_DISABLED": "1",
                           "LOG_LEVEL": "INFO"}.items():
            os.environ.setdefault(key, value)
        import submitter.app as handler_app

        return handler_app

    def _configure_submitter(self, handler_app) -> None:
        from submitter.jobs import Clients
        from submitter.settings import SubmitterSettings

        settings = SubmitterSettings.from_env(self._submitter_env())
        # Each object's outcome (queued in which job, duplicate, skipped, submit failure) comes
        # back through the submitter's callback: local mode never reads the handler's log text.
        handler_app.configure(settings=settings,
                              clients=Clients(batch=self.executor, s3=self.s3, dynamodb=self.dynamo_server.client()),
                              on_outcome=self.progress.on_outcome)
        # The handler logs JSON to stdout (CloudWatch Logs when deployed): here to a file.
        logger = logging.getLogger(os.environ.get("POWERTOOLS_SERVICE_NAME") or SERVICE)
        self._submitter_stream = open(state_dir(self.data_dir) / "logs" / "submitter.log", "a", encoding="utf-8")
        self._redirected: list[tuple[logging.StreamHandler, Any]] = []
        for h in logger.handlers:
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
                self._redirected.append((h, h.setStream(self._submitter_stream)))

    def _restore_submitter_log(self) -> None:
        for handler, old in getattr(self, "_redirected", []):
            handler.setStream(old)
        self._redirected = []
        if self._submitter_stream is not None:
            self._submitter_stream.close()
            self._submitter_stream = None

    def _deliver(self, event: dict) -> Any:
        """The Lambda invocation: the SAME handler, the SQS event shape the stack delivers."""
        import submitter.app as handler_app

        return handler_app.handler(event, LambdaContext())

    # ---------------------------------------------------------------- progress
    def _on_delivered(self, key: str, obj: dict) -> None:
        self.delivered[key] = str(obj.get("ETag", "")).strip('"')

    def _on_dead_letter(self, key: str, error: str) -> None:
        if self.progress is not None:
            self.progress.on_dead_letter(key, self.delivered.get(key, ""), error)

    # ---------------------------------------------------------------- --once
    def upload(self, files: list[Path]) -> dict[str, tuple[Path, str]]:
        """Upload ``files`` to the input prefix concurrently: ``{key: (path, etag)}``."""
        keys: dict[str, Path] = {}
        for path in files:
            key = f"{self.input_prefix}{path.name}"
            n = 1
            while key in keys:
                n += 1
                key = f"{self.input_prefix}{n}/{path.name}"
            keys[key] = path

        def put(item: tuple[str, Path]) -> tuple[str, tuple[Path, str]]:
            key, path = item
            with open(path, "rb") as body:
                response = self.s3.put_object(Bucket=self.bucket, Key=key, Body=body)
            return key, (path, str(response["ETag"]).strip('"'))

        with ThreadPoolExecutor(max_workers=min(8, max(1, len(keys)))) as pool:
            uploads = dict(pool.map(put, keys.items()))
        if self.watcher is not None:  # our own PUTs are whole: deliver the burst now, no settling wait
            self.watcher.uploaded({key: etag for key, (_path, etag) in uploads.items()})
            self.watcher.poll_soon()
        return uploads

    def _skip_rule(self, key: str, path: Path) -> str | None:
        """The submitter's own rules (:mod:`submitter.rules`): a skipped file never gets a job."""
        from submitter import rules
        from submitter.settings import SubmitterSettings

        try:
            size = path.stat().st_size
        except OSError:
            size = None
        return rules.skip_reason(key, size, SubmitterSettings.from_env(self._submitter_env()))

    def wait_for(self, uploads: dict[str, tuple[Path, str]], stop: threading.Event) -> dict[str, tuple[str, Any]]:
        """Until each key is final for its ETag: ``{key: (status, detail)}`` with status
        ``succeeded`` (detail: the completion marker), ``failed`` (the error marker) or ``skipped``."""
        results: dict[str, tuple[str, Any]] = {}
        for key, (path, _etag) in uploads.items():
            reason = self._skip_rule(key, path)
            if reason:  # the submitter skips it: no job will ever run
                results[key] = ("skipped", {"reason": reason})
        while len(results) < len(uploads) and not stop.is_set():
            for key, (_path, etag) in uploads.items():
                state = self.progress.final.get(key) if self.progress is not None else None
                if key not in results and state is not None and state.etag in (etag, ""):
                    results[key] = (state.status, state.detail)
            stop.wait(0.2)
        return results


# ---------------------------------------------------------------------------- CLI
def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "local",
        help="run the whole pipeline on this machine (embedded S3 + submitter + local Batch); no AWS account",
        description="Start an S3 endpoint on loopback over --data-dir (a folder is a bucket), feed every new "
                    f"object under s3://{DEFAULT_BUCKET}/{DEFAULT_INPUT_PREFIX} to the submitter Lambda handler "
                    "and run the jobs it submits as 'whisper-batch run-job' processes. Ctrl-C stops; queued "
                    "jobs run at the next start. With --once FILE...: upload, wait, print the transcripts, exit.",
    )
    p.add_argument("--data-dir", default=DEFAULT_DATA_DIR,
                   help="folder served as S3 (default %(default)s); DIR/whisper-batch/audio/ is the input prefix")
    p.add_argument("--workers", type=int, default=None,
                   help="jobs at once (default: one per 2 CPU cores, each on 2 threads; one job per NeuronCore when deployed)")
    p.add_argument("--port", type=int, default=None, help="S3 endpoint port on 127.0.0.1 (default: a free one)")
    p.add_argument("--pack-max-objects", type=int, default=None, metavar="N",
                   help="files per job at most (default: the stack's PackMaxObjects); 1 = one job per file")
    p.add_argument("--once", nargs="+", metavar="FILE", help="upload FILEs, wait for their transcripts, print them, exit")
    add_speaker_arguments(p)
    p.set_defaults(func=_command)


def _speaker_env(args: argparse.Namespace) -> dict[str, str]:
    """``WHISPER_BATCH_*`` variables for the speaker flags given (validated: ConfigError on bad counts)."""
    from batch_job.settings import ENV_PREFIX, Settings

    given = {k: v for k, v in settings_from_arguments(args).items() if v is not None}
    SpeakerOptions.from_settings(Settings.from_env().replace(**given))
    return {ENV_PREFIX + k.upper(): str(v).lower() if isinstance(v, bool) else str(v) for k, v in given.items()}


def _command(args: argparse.Namespace) -> int:
    for flag, value in (("--workers", args.workers), ("--pack-max-objects", args.pack_max_objects)):
        if value is not None and value < 1:
            print(f"whisper-batch local: {flag} must be at least 1", file=sys.stderr)
            return 2
    try:
        os.environ.update(_speaker_env(args))  # the jobs' settings travel in their environment, as on Batch
    except (ConfigError, ValueError) as exc:
        print(f"whisper-batch local: {exc}", file=sys.stderr)
        return 2
    files: list[Path] = []
    for name in args.once or []:
        path = Path(name).expanduser()
        if not path.is_file():
            print(f"whisper-batch local: no such file: {name}", file=sys.stderr)
            return 2
        files.append(path)
    once = bool(files)
    mode = LocalMode(args.data_dir, workers=args.workers, port=args.port, pack_max_objects=args.pack_max_objects,
                     out=sys.stderr if once else sys.stdout,
                     poll_interval=0.5 if once else 1.0, settle=0.5 if once else 1.0)
    stop = threading.Event()
    signals: list[int] = []

    def on_signal(signum: int, frame: Any) -> None:
        signals.append(signum)
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    warm = None
    if once and len(files) > 1:  # convert the packaged weights once, not in every first job at once
        warm = threading.Thread(target=_warm_model_cache, daemon=True)
        warm.start()
    try:
        try:
            mode.start()
        except Exception as exc:  # noqa: BLE001 - a message, not a traceback
            print(f"whisper-batch local: cannot start: {exc}", file=sys.stderr)
            return 1
        if once:
            if warm is not None:
                warm.join()
            return _run_once(mode, files, stop)
        print(mode.banner(), flush=True)
        if mode.resumed:
            mode.say("resumed", "-", f"{mode.resumed} job(s) queued from the previous run")
        print("Watching for new files; Ctrl-C to stop.", flush=True)
        while not stop.wait(0.5):
            pass
        print("stopping: interrupting running jobs (they stay queued) ...", flush=True)
        return 0
    finally:
        kept = mode.stop()
        if not once:
            print(f"stopped; {kept} job(s) queued for the next start" if kept else "stopped", flush=True)
        for s, handler in previous.items():
            signal.signal(s, handler)


def _warm_model_cache() -> None:
    try:
        from batch_job.engine.models import resolve_checkpoint
        from batch_job.settings import Settings

        settings = Settings.from_env()
        resolve_checkpoint(settings.model, settings.cache_dir)
    except Exception:  # noqa: BLE001 - the jobs report model problems themselves
        pass


def _run_once(mode: LocalMode, files: list[Path], stop: threading.Event) -> int:
    from batch_job.job import output_key

    mode.say("endpoint", mode.endpoint_url, f"(data in {mode.data_dir})")
    uploads = mode.upload(files)
    for key, (path, etag) in uploads.items():
        mode.say("uploaded", key, f"from {path} (etag {etag})")
    results = mode.wait_for(uploads, stop)
    failed = 0
    for key, (path, _etag) in uploads.items():
        status, detail = results.get(key, ("interrupted", None))
        local_base = mode.data_dir / mode.bucket / output_key(mode.output_prefix, key, "")
        if status == "succeeded":
            text = ""
            try:
                text = mode.s3.get_object(Bucket=mode.bucket, Key=output_key(mode.output_prefix, key, ".txt"))[
                    "Body"].read().decode("utf-8")
            except Exception:  # noqa: BLE001 - fall back to the marker's text
                text = str(detail.get("text", "")) if isinstance(detail, dict) else ""
            print(f"==> {path}  (s3://{mode.bucket}/{output_key(mode.output_prefix, key, '.txt')})")
            print(text.strip())
            print(f"    files: {local_base}.{{txt,srt,vtt,json}}\n", flush=True)
        else:
            failed += 1
            if isinstance(detail, dict):
                reason = f"{detail.get('reason') or detail.get('statusReason')}: {detail.get('message', '')}".rstrip(": ")
            else:
                reason = str(detail or status)
            print(f"==> {path}  FAILED ({status}): {reason}", flush=True)
            if status == "failed":
                print(f"    marker: {local_base}.error.json\n", flush=True)
    if stop.is_set() and len(results) < len(uploads):
        return 130
    return 1 if failed else 0

