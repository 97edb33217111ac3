"""A job's objects, one or a pack, through ONE loaded model: :func:`run_pack` and :func:`run_job`.

1. ``start``  the objects' URIs and the output formats are checked (ConfigError: exit 78, nothing
              written).
2. Every object is HEADed and skipped when done (:meth:`ObjectJob.head`), before anything loads.
3. The objects left are downloaded and decoded lazily, one at a time, by a generator that
   :meth:`Transcriber.transcribe_many` pulls as its batches need audio: windows are batched across
   the pack's files and memory holds only what the batches need. A file that fails (bad audio,
   S3) gets its error marker there and the others go on.
4. The model is loaded once, when the first object has decoded (bad input fails fast, a pack
   of finished or broken objects never loads it).
5. Each object's outputs and marker are written as soon as that object is done.
6. A failure of the whole job (model load, SIGTERM, an engine error) gives every unfinished object
   its error marker; finished objects keep their outputs.

Exit code: any retryable failure -> 75 (S3, SIGTERM, device) or 70 (unexpected), so Batch
retries and the retry does only what is left; else any permanent failure -> 78 (config, model)
or 65 (bad input); else 0. A pack of one is exactly the single-object job.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import replace
from itertools import chain
from pathlib import Path
from typing import IO, Any, Protocol

import numpy as np

from batch_job import __version__, exit_codes, metrics, s3io
from batch_job.errors import ConfigError, InterruptedJobError, ModelError, WhisperBatchError
from batch_job.job.context import JobContext, JobResult, PackResult
from batch_job.job.keys import DEFAULT_OUTPUT_PREFIX
from batch_job.job.log import JsonLog
from batch_job.job.objects import ObjectJob, Runtime, emit
from batch_job.job.signals import Interrupts, signal_handlers
from batch_job.neuron_monitor import NeuronMonitorSampler
from batch_job.result import FileResult
from batch_job.settings import Settings
from batch_job.speakers.options import SpeakerOptions
from batch_job.subtitles import CueOptions
from batch_job.writers import FORMATS

#: Seconds between progress log lines while decoding.
PROGRESS_LOG_INTERVAL = 10.0
#: Retryable exit codes first: one of them means Batch must retry the pack.
_EXIT_PRIORITY = (exit_codes.TRANSIENT, exit_codes.INTERNAL, exit_codes.CONFIG_ERROR, exit_codes.INPUT_ERROR)


class FileTranscriber(Protocol):
    """What the job needs of the engine (:class:`batch_job.transcribe.Transcriber` is one)."""

    model_name: str

    def transcribe_many(self, inputs: Iterable[tuple[str, np.ndarray]], *, language: str | None = None,
                        task: str = "transcribe", on_window: Callable[[int, int], None] | None = None,
                        ) -> Iterator[FileResult]: ...


def load_transcriber(settings: Settings) -> FileTranscriber:
    """The engine for ``settings.model`` on ``settings.device`` (weights and graphs from the image)."""
    from batch_job.transcribe import Transcriber

    return Transcriber.load(settings)


def exit_code_of(results: Iterable[JobResult]) -> int:
    """The job's exit code from its objects' (see the module docstring)."""
    codes = {r.exit_code for r in results}
    return next((c for c in _EXIT_PRIORITY if c in codes), exit_codes.OK)


def run_job(input_uri: str, output_uri: str | None = None, **kwargs: Any) -> JobResult:
    """Transcribe one object (a pack of one); never raises for job failures. See :func:`run_pack`."""
    return run_pack([(input_uri, output_uri)], **kwargs).objects[0]


def run_pack(
    entries: Sequence[tuple[str, str | None]],
    *,
    settings: Settings,
    manifest: str | None = None,
    transcriber: FileTranscriber | None = None,
    transcriber_factory: Callable[[Settings], FileTranscriber] | None = None,
    s3: Any = None,
    cloudwatch: Any = None,
    context: JobContext | None = None,
    log: JsonLog | None = None,
    metrics_stream: IO[str] | None = None,
    install_signal_handlers: bool = True,
) -> PackResult:
    """Run one job over ``entries`` (``(input s3 URI, output prefix URI or None)``); never raises.

    ``output`` ``None`` = ``s3://<input bucket>/transcripts/``. ``manifest`` names the pack
    manifest the entries came from (recorded in markers; enables the pack metrics). The model is
    ``transcriber``, else ``transcriber_factory(settings)`` (default :func:`load_transcriber`),
    called only when an object has decoded. ``s3``/``cloudwatch`` default to boto3 clients.
    """
    context = context or JobContext.from_env()
    log = log or JsonLog(job_id=context.job_id, attempt=context.attempt)
    interrupts = Interrupts()
    with signal_handlers(interrupts, install_signal_handlers):
        rt = Runtime(settings=settings, s3=s3, context=context, log=log, interrupts=interrupts,
                     cloudwatch=cloudwatch, metrics_stream=metrics_stream, started=time.monotonic(),
                     pack={"manifest": manifest} if manifest else None)
        try:
            formats, targets = _plan(settings, entries)
        except ConfigError as exc:
            return _config_failure(rt, entries, exc)
        distinct = list(dict.fromkeys(targets))  # an object listed twice is transcribed once
        rt = replace(rt, s3=s3 if s3 is not None else s3io.aws_client("s3", settings.s3_max_attempts),
                     pack={**rt.pack, "objects": len(distinct)} if rt.pack else None)
        objects = {target: ObjectJob(rt, *target, formats) for target in distinct}
        _log_start(rt, list(objects.values()))
        run = _PackRun(rt, list(objects.values()), transcriber, transcriber_factory or load_transcriber)
        try:
            run.run()
        finally:
            interrupts.armed = False
            run.close()
        return replace(run.finish(), objects=[objects[target].result for target in targets])


def _plan(settings: Settings, entries: Sequence[tuple[str, str | None]],
          ) -> tuple[tuple[str, ...], list[tuple[s3io.S3Uri, s3io.S3Uri]]]:
    """The validated output formats (JSON aside) and each entry's (input, output prefix)."""
    formats = tuple(f for f in dict.fromkeys(settings.format_list) if f != "json")
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown:
        raise ConfigError(f"unknown output format(s) {unknown}; known: {list(FORMATS)}")
    try:
        CueOptions.from_settings(settings)
    except ValueError as exc:
        raise ConfigError(f"subtitle settings: {exc}") from None
    SpeakerOptions.from_settings(settings)  # bad speaker counts: ConfigError before anything loads
    if not entries:
        raise ConfigError("the job names no input")
    targets = []
    for input_uri, output_uri in entries:
        try:
            src = s3io.S3Uri.parse(input_uri)
            dst = s3io.S3Uri.parse(output_uri or f"s3://{src.bucket}/{DEFAULT_OUTPUT_PREFIX}", prefix=True)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        targets.append((src, dst))
    return formats, targets


def _log_start(rt: Runtime, objects: list[ObjectJob]) -> None:
    first = objects[0]
    formats = [*first.formats, "json"]
    if rt.pack is None:
        rt.log("start", input=first.input_uri, output=str(first.dst), formats=formats, model=rt.settings.model)
    else:
        rt.log("start", manifest=rt.pack["manifest"], objects=len(objects), output=str(first.dst),
               formats=formats, model=rt.settings.model)


def _config_failure(rt: Runtime, entries: Sequence[tuple[str, str | None]], exc: ConfigError) -> PackResult:
    """Bad parameters: nothing can be written where it belongs; log, count, exit 78."""
    code = exit_codes.CONFIG_ERROR
    rt.log("failed", level="error", reason=exc.reason, message=exc.message, retryable=False, exit_code=code)
    emit(rt, metrics.job_metrics(rt.settings, succeeded=False, reason=exc.reason, properties={
        "JobId": rt.context.job_id, "Attempt": rt.context.attempt, "WorkerVersion": __version__,
        "Input": rt.pack["manifest"] if rt.pack else (entries[0][0] if entries else None)}))
    result = JobResult(code, "failed", reason=exc.reason, message=exc.message)
    return PackResult(code, [result] * max(1, len(entries)))


def _per_object(exc: BaseException, interrupts: Interrupts) -> bool:
    """Whether ``exc`` is one object's failure (the others go on) rather than the whole job's."""
    return (isinstance(exc, Exception) and not isinstance(exc, (InterruptedJobError, ModelError))
            and interrupts.signum is None)


class _PackRun:
    """The steps of :func:`run_pack` for one job; ``run`` never leaves an object unfinished."""

    def __init__(self, rt: Runtime, objects: list[ObjectJob], transcriber: FileTranscriber | None,
                 factory: Callable[[Settings], FileTranscriber]) -> None:
        self.rt = rt
        self.objects = objects
        self.transcriber = transcriber
        self.factory = factory
        self.tmp_dir: Path | None = None
        self.sampler: NeuronMonitorSampler | None = None
        self.job_figures: dict[str, Any] = {}
        self.model_name = rt.settings.model
        self._progress = {"first": None, "last_log": 0.0}

    def run(self) -> None:
        try:
            for obj in self.objects:
                self._guarded(obj, obj.head)
            stream = self._decoded()
            first = next(stream, None)
            if first is None:
                return  # nothing decoded: no model load
            transcriber = self._load()
            self.sampler = NeuronMonitorSampler(self.rt.settings.neuron_monitor,
                                                period_seconds=self.rt.settings.neuron_monitor_period).start()
            self._transcribe(transcriber, chain([first], stream))
            for obj in self.objects:
                if obj.result is None:  # the engine yielded nothing for it: never leave it unmarked
                    obj.fail(RuntimeError("the engine returned no result for this file"))
        except BaseException as exc:  # noqa: BLE001 - the whole job failed: every unfinished object says so
            self.rt.interrupts.armed = False  # a second SIGTERM must not interrupt the cleanup
            for obj in self.objects:
                if obj.result is None:
                    obj.fail(exc)

    def _guarded(self, obj: ObjectJob, step: Callable[[], Any]) -> Any:
        """Run one object's step; its own failure becomes its error marker, a job failure propagates."""
        try:
            return step()
        except BaseException as exc:
            self._fail_one(obj, exc)
            return None

    def _fail_one(self, obj: ObjectJob, exc: BaseException) -> None:
        """``exc`` as ``obj``'s own failure (its error marker), or re-raised when it fails the whole job."""
        if not _per_object(exc, self.rt.interrupts) or obj.result is not None:
            raise exc
        obj.fail(exc)

    def _decoded(self) -> Iterator[tuple[ObjectJob, np.ndarray]]:
        """Download and decode the unfinished objects one at a time, as they are pulled."""
        settings = self.rt.settings
        for obj in self.objects:
            if obj.result is not None:
                continue
            self.rt.interrupts.check()
            if self.tmp_dir is None:
                if settings.work_dir:
                    Path(settings.work_dir).mkdir(parents=True, exist_ok=True)
                self.tmp_dir = Path(tempfile.mkdtemp(prefix="whisper-batch-", dir=settings.work_dir or None))
            samples = self._guarded(obj, lambda o=obj: o.fetch(self.tmp_dir))
            if samples is not None:
                yield obj, samples

    def _load(self) -> FileTranscriber:
        settings, interrupts = self.rt.settings, self.rt.interrupts
        if self.transcriber is None:
            t0 = time.monotonic()
            try:
                self.transcriber = self.factory(settings)
            except WhisperBatchError:
                raise
            except Exception as exc:
                if interrupts.signum is not None:
                    raise interrupts.error() from exc
                raise ModelError(f"cannot load model {settings.model!r}: {type(exc).__name__}: {exc}") from exc
            self.job_figures["model_load_seconds"] = round(time.monotonic() - t0, 3)
        interrupts.check()
        self.model_name = getattr(self.transcriber, "model_name", settings.model)
        self.rt.log("model_ready", model=self.model_name,
                    model_load_seconds=self.job_figures.get("model_load_seconds"))
        return self.transcriber

    def _on_window(self, done: int, total: int) -> None:
        now = time.monotonic()
        if self._progress["first"] is None:
            self._progress["first"] = now
            self.rt.log("first_window", done=done, total=total)
        elif done >= total or now - self._progress["last_log"] >= PROGRESS_LOG_INTERVAL:
            self.rt.log("progress", done=done, total=total)
        self._progress["last_log"] = now
        self.rt.interrupts.check()

    def _transcribe(self, transcriber: FileTranscriber, decoded: Iterator[tuple[ObjectJob, np.ndarray]]) -> None:
        by_name: dict[str, ObjectJob] = {}

        def inputs() -> Iterator[tuple[str, np.ndarray]]:
            for n, (obj, samples) in enumerate(decoded):
                by_name[str(n)] = obj
                yield str(n), samples

        settings = self.rt.settings
        for done in transcriber.transcribe_many(inputs(), language=settings.language or None, task=settings.task,
                                                on_window=self._on_window):
            obj = by_name.pop(done.name)
            self.rt.interrupts.check()
            if done.error is not None:
                self._fail_one(obj, done.error)
                continue
            assert done.transcript is not None
            figures = dict(self.job_figures)
            utilization = self.sampler.result() if self.sampler is not None else None
            if utilization is not None:
                figures.update(utilization.as_figures())
            self._guarded(obj, lambda o=obj, t=done.transcript, f=figures: o.commit(
                t, model_name=self.model_name, extra_figures=f))

    def close(self) -> None:
        if self.sampler is not None:
            self.sampler.stop()
        if self.tmp_dir is not None:
            shutil.rmtree(self.tmp_dir, ignore_errors=True)

    def finish(self) -> PackResult:
        results = [obj.result for obj in self.objects]
        assert all(r is not None for r in results), "every object ends succeeded, skipped or failed"
        code = exit_code_of(results)
        figures: dict[str, Any] = {}
        if self.rt.pack is not None:
            wall = time.monotonic() - self.rt.started
            audio = sum(r.figures.get("audio_seconds") or 0.0 for r in results if r.status == "succeeded")
            figures = {"objects": len(results), **{s: sum(r.status == s for r in results)
                                                   for s in ("succeeded", "skipped", "failed")},
                       "audio_seconds": round(audio, 3), "wall_seconds": round(wall, 3),
                       "throughput": round(audio / wall, 3) if wall > 0 else None,
                       "model_load_seconds": self.job_figures.get("model_load_seconds")}
            emit(self.rt, metrics.pack_metrics(self.rt.settings, figures=figures, properties={
                "JobId": self.rt.context.job_id, "Attempt": self.rt.context.attempt,
                "Manifest": self.rt.pack["manifest"], "WorkerVersion": __version__}))
            self.rt.log("pack_done", exit_code=code, **figures)
        return PackResult(code, results, figures)
