"""``whisper-batch run-job``: one AWS Batch job = one S3 object in, transcripts + markers + metrics out.

Stages (one JSON log line each on stderr, ``{"stage": ..., "elapsed_s": <since process start>}``):

1. ``start``      parse ``--input s3://B/K`` and ``--output s3://B/P/``.
2. ``head``       HEAD the input: size, ETag, VersionId (``missing_input`` if gone).
3. ``skip``       the completion marker ``P+K.json`` already holds this ETag -> exit 0, no model load.
4. ``download``   ``too_large`` checked before any GET; streamed to a temp dir under
                  ``settings.work_dir``, every GET pinned with IfMatch/VersionId.
5. ``audio``      decode to 16 kHz mono (``corrupt_audio``/``empty_audio``/``unsupported_format``/``too_long``),
                  before the model is loaded so bad input fails fast.
6. ``model_ready`` ``Transcriber.load(settings)`` (weights and graphs from the image).
7. ``first_window``/``transcribed`` decoding, neuron-monitor sampled meanwhile when present.
8. ``uploaded``   ``P+K.txt/.srt/.vtt`` then ``P+K.json`` LAST (the completion marker), then the
                  stale ``P+K.error.json`` (if any) is deleted.
9. ``done``       metrics (EMF on stdout, or PutMetricData).

On failure: outputs this attempt may have written are deleted (and an older marker for another
ETag was already deleted before the first upload), ``P+K.error.json`` is written with
``{reason, message, retryable, exit_code, source, attempt, ...}``, ``JobsFailed`` is emitted
and the exit code comes from :func:`batch_job.exit_codes.for_error`.

SIGTERM/SIGINT: the handler (main thread) raises :class:`InterruptedJobError` at the next
bytecode, wherever the job is; the failure path above then removes this attempt's outputs,
writes the error marker (reason ``interrupted``) and exits 75 (retry). Once the completion
marker is written, signals no longer interrupt (the work is done, exit 0). Temp files are
removed on every exit path. A hard kill (SIGKILL) can leave outputs without a marker; only the
``.json`` marker means "done" and a retry overwrites them.

Per-job figures (in the marker under ``job`` and as metrics): ``audio_seconds``;
``processing_seconds`` = audio decode + transcription wall time (no S3, no model load);
``real_time_factor`` = processing_seconds / audio_seconds (lower is faster);
``model_load_seconds``; ``neuroncore_utilization_avg``/``_peak`` when neuron-monitor sampled.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import IO, Any

from batch_job import __version__, exit_codes
from batch_job.errors import InterruptedJobError, ModelError, WhisperBatchError
from batch_job.settings import Settings

#: Output prefix when neither ``--output`` nor ``WHISPER_BATCH_OUTPUT_URI`` is given.
DEFAULT_OUTPUT_PREFIX = "transcripts/"
#: Tag on every error marker: the stack's lifecycle rule expires objects under the output prefix
#: carrying it (S3 lifecycle cannot match the ``.error.json`` suffix; see docs/deploy.md).
ERROR_MARKER_TAGS = {"whisper-batch:marker": "error"}
#: Seconds between progress log lines while decoding.
PROGRESS_LOG_INTERVAL = 10.0


# --------------------------------------------------------------------------- keys and context
def output_key(prefix: str, input_key: str, suffix: str) -> str:
    """``PREFIX + full input key + suffix``: the key is kept verbatim (spaces, unicode, ``+``)."""
    return f"{prefix}{input_key}{suffix}"


def marker_key(prefix: str, input_key: str) -> str:
    return output_key(prefix, input_key, ".json")


def error_marker_key(prefix: str, input_key: str) -> str:
    return output_key(prefix, input_key, ".error.json")


@dataclass(frozen=True)
class JobContext:
    """What AWS Batch tells the container about this job (runtime facts, not configuration)."""

    job_id: str | None = None
    attempt: int | None = None
    array_index: int | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> JobContext:
        env = os.environ if environ is None else environ

        def _int(name: str) -> int | None:
            try:
                return int(env[name])
            except (KeyError, ValueError):
                return None

        return cls(job_id=env.get("AWS_BATCH_JOB_ID") or None, attempt=_int("AWS_BATCH_JOB_ATTEMPT"),
                   array_index=_int("AWS_BATCH_JOB_ARRAY_INDEX"))


@dataclass
class JobResult:
    """Outcome of :func:`run_job`; ``exit_code`` is what the process must exit with."""

    exit_code: int
    status: str  # "succeeded" | "skipped" | "failed"
    reason: str | None = None
    message: str | None = None
    outputs: list[str] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)
    source: dict[str, Any] | None = None


class ConfigError(WhisperBatchError):
    """Bad job parameters or settings (URI, formats, manifest): exit 78, no marker can be written."""

    reason = "config_error"
    retryable = False


# --------------------------------------------------------------------------- logging
def process_start_time() -> float:
    """Wall-clock time this process was created (so stage times include interpreter start-up).

    On Linux: now minus the process's age, both read against the same clock (``/proc/uptime``
    and the start tick in ``/proc/self/stat``), accurate to a clock tick (10 ms). Not
    ``psutil.Process().create_time()``: it adds the start tick to the boot time, which the
    kernel reports in whole seconds, so its figure was off by up to 1 s (0.28 s on the dev box,
    which every stage time carried).
    """
    try:
        return time.time() - process_age_seconds()
    except (OSError, ValueError, IndexError):  # not Linux, or an unexpected /proc layout
        return time.time()


def process_age_seconds(pid: int | str = "self") -> float:
    """Seconds since process ``pid`` was created, from ``/proc`` (Linux)."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        stat = f.read()
    # Field 22 (starttime, clock ticks since boot); fields counted after the ")" closing comm.
    start_ticks = int(stat.rsplit(")", 1)[1].split()[19])
    with open("/proc/uptime", encoding="ascii") as f:
        uptime = float(f.read().split()[0])
    return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))


class JsonLog:
    """One JSON object per line on stderr: ``{"ts", "level", "stage", "elapsed_s", ...context, ...}``."""

    def __init__(self, stream: IO[str] | None = None, *, started_at: float | None = None, **context: Any) -> None:
        self.stream = stream
        self.started_at = process_start_time() if started_at is None else started_at
        self.context = {k: v for k, v in context.items() if v is not None}
        self._lock = threading.Lock()

    def __call__(self, stage: str, level: str = "info", **fields: Any) -> None:
        now = time.time()
        line = {"ts": datetime.fromtimestamp(now, tz=timezone.utc).isoformat(timespec="milliseconds"),
                "level": level, "stage": stage, "elapsed_s": round(now - self.started_at, 3)}
        line.update(self.context)
        line.update({k: v for k, v in fields.items() if v is not None})
        text = json.dumps(line, ensure_ascii=False, default=str)
        with self._lock:
            out = self.stream if self.stream is not None else sys.stderr
            try:
                out.write(text + "\n")
                out.flush()
            except (OSError, ValueError):  # closed stream: logging must not fail the job
                pass


# --------------------------------------------------------------------------- signals
class _Interrupts:
    """SIGTERM/SIGINT -> InterruptedJobError in the main thread, once, while ``armed``."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.armed = True

    def error(self) -> InterruptedJobError:
        name = signal.Signals(self.signum).name if self.signum else "signal"
        return InterruptedJobError(f"received {name}; stopped before completion, retry will redo the job")

    def handler(self, signum: int, frame: Any) -> None:
        first = self.signum is None
        if first:
            self.signum = signum
        if first and self.armed:
            raise self.error()

    def check(self) -> None:
        """Raise if a signal arrived but its exception was swallowed somewhere (e.g. by a library)."""
        if self.signum is not None and self.armed:
            raise self.error()


@contextmanager
def _signal_handlers(interrupts: _Interrupts, install: bool) -> Iterator[None]:
    if not install or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, interrupts.handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


# --------------------------------------------------------------------------- the job
def _default_factory(settings: Settings):
    from batch_job.transcribe import Transcriber

    return Transcriber.load(settings)


def _local_name(key: str) -> str:
    """A safe local file name keeping the key's extension (decoders may look at it)."""
    suffix = PurePosixPath(key).suffix
    safe = "".join(c for c in suffix if c.isascii() and (c.isalnum() or c == "."))[:16]
    return "input" + (safe if len(safe) > 1 else "")


def _marker_matches(marker: Mapping[str, Any] | None, info) -> bool:
    if not marker:
        return False
    from batch_job.s3io import normalize_etag

    source = marker.get("source") or {}
    if not isinstance(source, Mapping) or normalize_etag(str(source.get("etag") or "")) != normalize_etag(info.etag):
        return False
    old_version = source.get("version_id")
    return not (old_version and info.version_id and old_version != info.version_id)


def run_job(
    input_uri: str,
    output_uri: str | None = None,
    *,
    settings: Settings,
    transcriber: Any = None,
    transcriber_factory: Callable[[Settings], Any] | None = None,
    s3: Any = None,
    cloudwatch: Any = None,
    context: JobContext | None = None,
    log: JsonLog | None = None,
    metrics_stream: IO[str] | None = None,
    install_signal_handlers: bool = True,
) -> JobResult:
    """Run one job. Never raises for job failures: returns a :class:`JobResult` with the exit code.

    ``transcriber`` (an object with the ``Transcriber`` interface) or ``transcriber_factory``
    (default ``Transcriber.load``) is used only when there is work to do; ``s3``/``cloudwatch``
    default to boto3 clients with standard retries.
    """
    from batch_job import metrics, s3io
    from batch_job.neuron_monitor import NeuronMonitorSampler

    context = context or JobContext.from_env()
    log = log or JsonLog(job_id=context.job_id, attempt=context.attempt)
    interrupts = _Interrupts()
    t_job = time.monotonic()
    figures: dict[str, Any] = {}
    source: dict[str, Any] | None = None
    out_bucket: str | None = None
    keys: dict[str, str] = {}
    error_key: str | None = None
    upload_started = False
    tmp_dir: str | None = None
    sampler = None

    def emit_metrics(succeeded: bool, reason: str | None = None) -> None:
        m = metrics.job_metrics(settings, succeeded=succeeded, reason=reason, figures=figures,
                                properties={"JobId": context.job_id, "Attempt": context.attempt,
                                            "Input": input_uri, "WorkerVersion": __version__})
        m.properties = {k: v for k, v in m.properties.items() if v is not None}
        problem = metrics.publish(m, settings.metrics_mode, stream=metrics_stream, cloudwatch=cloudwatch)
        if problem:
            log("metrics", level="warning", message=problem)

    with _signal_handlers(interrupts, install_signal_handlers):
        try:
            # 1. parameters --------------------------------------------------------------
            try:
                src = s3io.S3Uri.parse(input_uri)
                dst = s3io.S3Uri.parse(output_uri or f"s3://{src.bucket}/{DEFAULT_OUTPUT_PREFIX}", prefix=True)
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
            formats = [f for f in dict.fromkeys(settings.format_list) if f != "json"]
            from batch_job.writers import FORMATS

            unknown = sorted(set(formats) - set(FORMATS))
            if unknown:
                raise ConfigError(f"unknown output format(s) {unknown}; known: {list(FORMATS)}")
            out_bucket = dst.bucket
            keys = {fmt: output_key(dst.key, src.key, "." + fmt) for fmt in formats}
            keys["json"] = marker_key(dst.key, src.key)  # always written, always last
            error_key = error_marker_key(dst.key, src.key)
            source = {"bucket": src.bucket, "key": src.key, "etag": None, "version_id": None}
            log("start", input=str(src), output=str(dst), formats=[*formats, "json"], model=settings.model)

            if s3 is None:
                s3 = s3io.aws_client("s3", settings.s3_max_attempts)

            # 2. HEAD + 3. idempotency (before any model load) -----------------------------
            info = s3io.head_object(s3, src.bucket, src.key)
            source = info.source()
            log("head", size=info.size, etag=info.etag, version_id=info.version_id)
            existing = s3io.get_json(s3, out_bucket, keys["json"])
            if _marker_matches(existing, info):
                failed = s3io.delete_keys(s3, out_bucket, [error_key])
                log("skip", message="completion marker already holds this ETag; nothing to do",
                    marker=f"s3://{out_bucket}/{keys['json']}", stale_error_marker_not_deleted=failed or None)
                return JobResult(exit_codes.OK, "skipped", source=source, outputs=[])

            # 4. download -------------------------------------------------------------------
            s3io.check_size(info, settings.max_download_bytes)
            if settings.work_dir:
                Path(settings.work_dir).mkdir(parents=True, exist_ok=True)
            tmp_dir = tempfile.mkdtemp(prefix="whisper-batch-", dir=settings.work_dir or None)
            local = Path(tmp_dir) / _local_name(src.key)
            t0 = time.monotonic()
            s3io.download(s3, info, local, max_bytes=settings.max_download_bytes,
                          attempts=settings.download_attempts)
            figures["download_seconds"] = round(time.monotonic() - t0, 3)
            figures["input_bytes"] = info.size
            log("download", seconds=figures["download_seconds"], bytes=info.size)

            # 5. decode audio (before the model: bad input fails fast and cheap) -------------
            from batch_job.audio import SAMPLE_RATE, load_audio

            t_proc = time.monotonic()
            audio = load_audio(local, max_seconds=settings.max_audio_seconds)
            decode_audio_s = time.monotonic() - t_proc
            local.unlink(missing_ok=True)  # free the disk early; the samples are in memory
            figures["audio_seconds"] = round(len(audio) / SAMPLE_RATE, 3)
            log("audio", seconds=round(decode_audio_s, 3), audio_seconds=figures["audio_seconds"])

            # 6. model ------------------------------------------------------------------------
            if transcriber is None:
                factory = transcriber_factory or _default_factory
                t0 = time.monotonic()
                try:
                    transcriber = factory(settings)
                except WhisperBatchError:
                    raise
                except Exception as exc:
                    if interrupts.signum is not None:
                        raise interrupts.error() from exc
                    raise ModelError(f"cannot load model {settings.model!r}: {type(exc).__name__}: {exc}") from exc
                figures["model_load_seconds"] = round(time.monotonic() - t0, 3)
            interrupts.check()
            model_name = getattr(transcriber, "model_name", settings.model)
            log("model_ready", model=model_name, model_load_seconds=figures.get("model_load_seconds"))

            # 7. transcribe -------------------------------------------------------------------
            progress = {"first": None, "last_log": 0.0}

            def on_window(done: int, total: int) -> None:
                now = time.monotonic()
                if progress["first"] is None:
                    progress["first"] = now
                    log("first_window", done=done, total=total)
                elif done >= total or now - progress["last_log"] >= PROGRESS_LOG_INTERVAL:
                    log("progress", done=done, total=total)
                progress["last_log"] = now
                interrupts.check()

            sampler = NeuronMonitorSampler(settings.neuron_monitor, period_seconds=settings.neuron_monitor_period)
            sampler.start()
            t0 = time.monotonic()
            transcript = transcriber.transcribe(audio, language=settings.language or None,
                                                task=settings.task, on_window=on_window)
            transcribe_s = time.monotonic() - t0
            utilization = sampler.stop()
            sampler = None
            interrupts.check()
            del audio
            processing = decode_audio_s + transcribe_s
            figures["processing_seconds"] = round(processing, 3)
            audio_s = figures["audio_seconds"] or float(getattr(transcript, "duration", 0.0) or 0.0)
            figures["real_time_factor"] = round(processing / audio_s, 4) if audio_s > 0 else None
            if utilization is not None:
                figures.update(utilization.as_figures())
            log("transcribed", seconds=round(transcribe_s, 3), real_time_factor=figures["real_time_factor"],
                segments=len(getattr(transcript, "segments", ()) or ()))

            # 8. outputs: render everything first, then upload, marker last ------------------
            from batch_job.writers import render

            job_block = {**figures, "worker_version": __version__, "model": model_name,
                         "job_id": context.job_id, "attempt": context.attempt,
                         "job_seconds": round(time.monotonic() - t_job, 3),
                         "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
            bodies = {fmt: render(transcript, fmt) for fmt in formats}
            bodies["json"] = render(transcript, "json", extra={"source": source, "job": job_block})
            upload_started = True
            if existing is not None:  # an older marker (another ETag) must not vouch for new files
                s3io.delete_keys(s3, out_bucket, [keys["json"]])
            for fmt in formats:
                s3io.put_text(s3, out_bucket, keys[fmt], bodies[fmt])
            interrupts.check()
            s3io.put_text(s3, out_bucket, keys["json"], bodies["json"], metadata={"source-etag": source["etag"]})
            interrupts.armed = False  # committed: the job is done whatever arrives now
            failed = s3io.delete_keys(s3, out_bucket, [error_key])
            outputs = [keys[f] for f in formats] + [keys["json"]]
            log("uploaded", outputs=[f"s3://{out_bucket}/{k}" for k in outputs],
                stale_error_marker_not_deleted=failed or None)
            emit_metrics(True)
            log("done", status="succeeded", **{k: figures.get(k) for k in (
                "audio_seconds", "processing_seconds", "real_time_factor", "model_load_seconds")})
            return JobResult(exit_codes.OK, "succeeded", outputs=outputs, figures=dict(job_block), source=source)

        except BaseException as exc:  # noqa: BLE001 - every failure ends as a marker + exit code
            interrupts.armed = False  # a second SIGTERM must not interrupt the cleanup
            return _fail(exc, interrupts=interrupts, log=log, s3=s3, out_bucket=out_bucket, keys=keys,
                         error_key=error_key, upload_started=upload_started, source=source, context=context,
                         settings=settings, emit_metrics=emit_metrics, figures=figures)
        finally:
            interrupts.armed = False
            if sampler is not None:
                sampler.stop()
            if tmp_dir is not None:
                shutil.rmtree(tmp_dir, ignore_errors=True)


def _classify(exc: BaseException, interrupts: _Interrupts) -> WhisperBatchError:
    if interrupts.signum is not None:
        return exc if isinstance(exc, InterruptedJobError) else interrupts.error()
    if isinstance(exc, WhisperBatchError):
        return exc
    if isinstance(exc, KeyboardInterrupt):  # SIGINT without our handler (not the main thread)
        return InterruptedJobError("interrupted (KeyboardInterrupt)")
    return WhisperBatchError(f"unexpected {type(exc).__name__}: {exc}", reason="internal_error")


def _fail(exc: BaseException, *, interrupts: _Interrupts, log: JsonLog, s3: Any, out_bucket: str | None,
          keys: Mapping[str, str], error_key: str | None, upload_started: bool, source: dict[str, Any] | None,
          context: JobContext, settings: Settings, emit_metrics: Callable[..., None],
          figures: Mapping[str, Any]) -> JobResult:
    from batch_job import s3io

    err = _classify(exc, interrupts)
    if isinstance(err, ConfigError):
        code = exit_codes.CONFIG_ERROR
    else:  # an unexplained exception keeps its own class: for_error maps it to INTERNAL (70)
        code = exit_codes.for_error(exc if err.reason == "internal_error" and err is not exc else err)
    level = "error" if err.reason in {"internal_error", "s3_error", "interrupted"} else "warning"
    detail: dict[str, Any] = {}
    if err.reason == "internal_error":
        import traceback

        detail["traceback"] = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))[-4000:]
    log("failed", level=level, reason=err.reason, message=err.message, retryable=err.retryable,
        exit_code=code, **detail)
    if s3 is not None and out_bucket is not None and error_key is not None:
        if upload_started:
            # No partial outputs: whatever this attempt may have written goes (marker included,
            # in case its PUT landed but the response was lost).
            failed = s3io.delete_keys(s3, out_bucket, keys.values())
            log("cleanup", removed=[f"s3://{out_bucket}/{k}" for k in keys.values()], not_removed=failed or None,
                level="error" if failed else "info")
        marker = {
            "reason": err.reason, "message": err.message, "retryable": err.retryable, "exit_code": code,
            "source": source, "attempt": context.attempt, "job_id": context.job_id,
            "worker_version": __version__, "model": settings.model,
            "failed_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        try:
            s3io.put_text(s3, out_bucket, error_key, json.dumps(marker, ensure_ascii=False, indent=2) + "\n",
                          tags=ERROR_MARKER_TAGS)
            log("error_marker", marker=f"s3://{out_bucket}/{error_key}")
        except Exception as put_exc:  # the exit code still tells Batch what to do
            log("error_marker", level="error", message=f"cannot write error marker: {put_exc}")
    emit_metrics(False, err.reason)
    return JobResult(code, "failed", reason=err.reason, message=err.message, source=source, figures=dict(figures))


# --------------------------------------------------------------------------- array jobs
def is_manifest_uri(uri: str | None) -> bool:
    """Array-job manifests are JSON Lines objects (``<OutputPrefix>_manifests/*.jsonl``)."""
    return bool(uri) and uri.startswith("s3://") and uri.lower().endswith(".jsonl")


def manifest_entry(s3: Any, manifest_uri: str, index: int) -> tuple[str, str | None]:
    """``(input_uri, output_uri or None)`` of element ``index`` of an array job's manifest.

    Manifest contract (submitter/bulk.py, docs/submitter.md): JSON Lines, line ``i`` (0-based,
    blank lines ignored) is element ``AWS_BATCH_JOB_ARRAY_INDEX=i``:
    ``{"index": i, "input": "s3://B/K", "output": "s3://B/P/", "etag": ..., "size": ...}``.
    ``{"bucket": ..., "key": ...}`` lines are accepted too. ``etag`` is informational: the job
    transcribes the object's current version and records that ETag in the marker.
    """
    from batch_job import s3io

    try:
        uri = s3io.S3Uri.parse(manifest_uri)
    except ValueError as exc:
        raise ConfigError(f"bad manifest URI: {exc}") from None
    try:
        text = s3io.get_text(s3, uri.bucket, uri.key)
    except WhisperBatchError as exc:
        if exc.reason == "missing_input":  # the manifest itself is gone: a submission problem
            raise ConfigError(f"manifest does not exist: {manifest_uri}") from None
        raise
    entries = []
    for n, line in enumerate(row for row in text.splitlines() if row.strip()):
        try:
            entry = json.loads(line)
        except ValueError as exc:
            raise ConfigError(f"manifest line {n} is not JSON: {exc}") from None
        entries.append(entry if isinstance(entry, dict) else {})
    if not 0 <= index < len(entries):
        raise ConfigError(f"array index {index} is outside the manifest ({len(entries)} entries): {manifest_uri}")
    entry = entries[index]
    if entry.get("index", index) != index:  # lines out of order: find ours by its index field
        entry = next((e for e in entries if e.get("index") == index), {})
    if entry.get("input"):
        return str(entry["input"]), (str(entry["output"]) if entry.get("output") else None)
    if entry.get("bucket") and entry.get("key"):
        return f"s3://{entry['bucket']}/{entry['key']}", None
    raise ConfigError(f"manifest element {index} names no input ({{\"input\": \"s3://...\"}}): {manifest_uri}")


# --------------------------------------------------------------------------- CLI
def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "run-job",
        help="AWS Batch entry point: transcribe one S3 object to s3://.../PREFIX/<key>.{json,txt,srt,vtt}",
        description="Transcribe one S3 object. Exit codes: 0 done/already done, 65 bad input, "
                    "75 transient (S3, SIGTERM; retry), 78 config/model error, 70 unexpected (retry).",
    )
    p.add_argument("--input", help="s3://BUCKET/KEY, or for array jobs the .jsonl manifest "
                                   "(default $WHISPER_BATCH_INPUT_URI)")
    p.add_argument("--output", help=f"s3://BUCKET/PREFIX/ (default $WHISPER_BATCH_OUTPUT_URI, "
                                    f"else s3://<input bucket>/{DEFAULT_OUTPUT_PREFIX})")
    p.add_argument("--manifest", help="array jobs: s3:// JSON-lines manifest whose line "
                                      "$AWS_BATCH_JOB_ARRAY_INDEX is the input (default $WHISPER_BATCH_MANIFEST_URI)")
    p.add_argument("--model", help="model name or path in the image (default $WHISPER_BATCH_MODEL)")
    p.add_argument("--language", help="language code, e.g. en (default: detect)")
    p.add_argument("--task", choices=("transcribe", "translate"))
    p.add_argument("--formats", help="comma-separated subset of json,txt,srt,vtt (json is always written)")
    p.set_defaults(func=_command)


def _pre_job_signal(signum: int, frame: Any) -> None:
    # Before run_job installs its handlers nothing has been written yet: just exit retryable.
    # (The image runs whisper-batch as PID 1, which would otherwise ignore SIGTERM entirely.)
    raise SystemExit(exit_codes.TRANSIENT)


def _command(args: Any) -> int:
    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {sig: signal.signal(sig, _pre_job_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return _run_command(args)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _run_command(args: Any) -> int:
    context = JobContext.from_env()
    log = JsonLog(job_id=context.job_id, attempt=context.attempt)
    try:
        settings = Settings.from_env().replace(model=args.model, language=args.language, task=args.task,
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
    s3 = None
    if context.array_index is not None and manifest:
        # Array job: --input (or --manifest) is the manifest; our element is line ARRAY_INDEX.
        from batch_job import s3io

        s3 = s3io.aws_client("s3", settings.s3_max_attempts)
        try:
            input_uri, entry_output = manifest_entry(s3, manifest, context.array_index)
        except WhisperBatchError as exc:
            code = exit_codes.CONFIG_ERROR if isinstance(exc, ConfigError) else exit_codes.for_error(exc)
            log("failed", level="error", reason=exc.reason, message=exc.message, exit_code=code)
            return code
        output_uri = args.output or entry_output or output_uri
        log("manifest", manifest=manifest, index=context.array_index, input=input_uri)
    elif is_manifest_uri(input_uri):
        log("failed", level="error", reason="config_error", exit_code=exit_codes.CONFIG_ERROR,
            message=f"{input_uri} is a manifest but AWS_BATCH_JOB_ARRAY_INDEX is not set")
        return exit_codes.CONFIG_ERROR
    if not input_uri:
        log("failed", level="error", reason="config_error", exit_code=exit_codes.CONFIG_ERROR,
            message="no input: pass --input s3://BUCKET/KEY (or a manifest with AWS_BATCH_JOB_ARRAY_INDEX)")
        return exit_codes.CONFIG_ERROR
    result = run_job(input_uri, output_uri, settings=settings, s3=s3, context=context, log=log)
    return result.exit_code
