"""One S3 object's way through a job: HEAD, skip, download + decode, outputs, or its error marker.

:class:`ObjectJob` is the stage object of the worker. The pack runner (:mod:`batch_job.job.pack`)
calls its steps in order for every object of a job, one or many:

1. :meth:`ObjectJob.head`   HEAD the input; ``True`` when there is nothing to do: the completion
                            marker already holds this ETag, or (in a pack) an earlier attempt of
                            this same Batch job failed it for good.
2. :meth:`ObjectJob.fetch`  ``too_large`` checked before any GET; the download is pinned to HEAD's
                            ETag/VersionId; decoded to 16 kHz mono; the local file removed at once.
3. :meth:`ObjectJob.commit` ``P+K.txt/.srt/.vtt``, then ``P+K.json`` LAST (the completion marker),
                            then the stale ``P+K.error.json`` deleted. The marker is written with
                            signals deferred, so a SIGTERM never leaves it half-done.
4. :meth:`ObjectJob.fail`   whatever this object's attempt wrote is deleted, ``P+K.error.json``
                            gets ``{reason, message, retryable, exit_code, source, ...}``.

Each step logs one JSON line carrying ``input``; each finished object emits its metrics and sets
:attr:`ObjectJob.result`.
"""

from __future__ import annotations

import json
import time
import traceback
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import IO, Any

import numpy as np

from batch_job import __version__, exit_codes, metrics, pricing, s3io
from batch_job.audio import SAMPLE_RATE, AudioWarning, decode_audio
from batch_job.errors import InterruptedJobError, WhisperBatchError
from batch_job.job.context import JobContext, JobResult
from batch_job.job.keys import ERROR_MARKER_TAGS, error_marker_key, marker_key, output_key, same_version
from batch_job.job.log import JsonLog
from batch_job.job.signals import Interrupts
from batch_job.result import Transcript
from batch_job.settings import Settings
from batch_job.subtitles import CueOptions
from batch_job.writers import render

#: Error reasons logged at level "error" (the others are the input's fault: "warning").
_ERROR_LEVEL_REASONS = frozenset({"internal_error", "s3_error", "interrupted"})


@dataclass(frozen=True)
class Runtime:
    """What every object of one job shares: settings, clients, the job's identity, its log.

    ``s3``/``cloudwatch`` are boto3 clients (or anything with their methods); ``pack`` is the
    marker's ``pack`` block (``{"manifest": uri, "objects": n}``) when the job came from a manifest.
    """

    settings: Settings
    s3: Any
    context: JobContext
    log: JsonLog
    interrupts: Interrupts
    cloudwatch: Any = None
    metrics_stream: IO[str] | None = None
    pack: Mapping[str, Any] | None = None
    started: float = 0.0  # time.monotonic() at job start


def classify(exc: BaseException, interrupts: Interrupts) -> tuple[WhisperBatchError, int]:
    """The error an exception stands for and the exit code it means (a signal trumps everything)."""
    if interrupts.signum is not None:
        err = exc if isinstance(exc, InterruptedJobError) else interrupts.error()
    elif isinstance(exc, WhisperBatchError):
        err = exc
    elif isinstance(exc, KeyboardInterrupt):  # SIGINT without our handler (not the main thread)
        err = InterruptedJobError("interrupted (KeyboardInterrupt)")
    else:
        return WhisperBatchError(f"unexpected {type(exc).__name__}: {exc}", reason="internal_error"), exit_codes.INTERNAL
    return err, exit_codes.for_error(err)


def _local_name(key: str) -> str:
    """A safe local file name: the key's base name (error messages then name the file), the
    extension kept (decoders may look at it), anything but ASCII letters, digits, ``._-`` replaced."""
    name = PurePosixPath(key).name
    safe = "".join(c if c.isascii() and (c.isalnum() or c in "._-") else "_" for c in name)[-100:]
    return safe.lstrip(".") or "input"


class ObjectJob:
    """See the module docstring. ``formats`` are the validated non-JSON formats (JSON always comes last)."""

    def __init__(self, rt: Runtime, src: s3io.S3Uri, dst: s3io.S3Uri, formats: tuple[str, ...]) -> None:
        self.rt = rt
        self.src = src
        self.dst = dst
        self.formats = formats
        self.keys = {fmt: output_key(dst.key, src.key, "." + fmt) for fmt in formats}
        self.keys["json"] = marker_key(dst.key, src.key)
        self.error_key = error_marker_key(dst.key, src.key)
        self.figures: dict[str, Any] = {}
        self.warnings: tuple[AudioWarning, ...] = ()
        self.info: s3io.ObjectInfo | None = None
        self.existing: dict[str, Any] | None = None
        self.upload_started = False
        self.result: JobResult | None = None

    @property
    def input_uri(self) -> str:
        return str(self.src)

    @property
    def source(self) -> dict[str, Any]:
        """The markers' ``source`` block (ETag ``None`` until HEAD answered)."""
        if self.info is not None:
            return self.info.source()
        return {"bucket": self.src.bucket, "key": self.src.key, "etag": None, "version_id": None}

    def log(self, stage: str, level: str = "info", **fields: Any) -> None:
        self.rt.log(stage, level=level, input=self.input_uri, **fields)

    # ------------------------------------------------------------------ 1. HEAD and skip
    def head(self) -> bool:
        """HEAD the input; ``True`` (and :attr:`result` set) when there is nothing left to do."""
        s3, bucket = self.rt.s3, self.dst.bucket
        self.info = info = s3io.head_object(s3, self.src.bucket, self.src.key)
        self.log("head", size=info.size, etag=info.etag, version_id=info.version_id)
        self.existing = s3io.get_json(s3, bucket, self.keys["json"])
        if same_version(self.existing, info):
            failed = s3io.delete_keys(s3, bucket, [self.error_key])
            self.log("skip", message="completion marker already holds this ETag; nothing to do",
                     marker=f"s3://{bucket}/{self.keys['json']}", stale_error_marker_not_deleted=failed or None)
            self.result = JobResult(exit_codes.OK, "skipped", source=self.source, outputs=[])
            return True
        job_id = self.rt.context.job_id
        if self.rt.pack is not None and job_id:
            earlier = s3io.get_json(s3, bucket, self.error_key)
            if (same_version(earlier, info) and earlier.get("retryable") is False
                    and earlier.get("job_id") == job_id):
                code = earlier.get("exit_code")
                code = code if code in exit_codes.PERMANENT else exit_codes.INPUT_ERROR
                self.log("skip", message="failed for good in an earlier attempt of this job; not redone",
                         reason=earlier.get("reason"), exit_code=code)
                self.result = JobResult(code, "failed", reason=earlier.get("reason"),
                                        message=earlier.get("message"), source=self.source)
                return True
        return False

    # ------------------------------------------------------------------ 2. download and decode
    def fetch(self, tmp_dir: Path) -> np.ndarray:
        """Download and decode; returns float32 samples, shape ``(n,)``, 16 kHz mono."""
        assert self.info is not None, "head() first"
        settings = self.rt.settings
        s3io.check_size(self.info, settings.max_download_bytes)
        local = tmp_dir / _local_name(self.src.key)
        t0 = time.monotonic()
        try:
            s3io.download(self.rt.s3, self.info, local, max_bytes=settings.max_download_bytes,
                          attempts=settings.download_attempts)
            self.figures["download_seconds"] = round(time.monotonic() - t0, 3)
            self.figures["input_bytes"] = self.info.size
            self.log("download", seconds=self.figures["download_seconds"], bytes=self.info.size)
            t0 = time.monotonic()
            decoded = decode_audio(local, max_seconds=settings.max_audio_seconds)
        finally:
            local.unlink(missing_ok=True)  # free the disk early; the samples are in memory
        self.figures["decode_audio_seconds"] = round(time.monotonic() - t0, 3)
        self.figures["audio_seconds"] = round(len(decoded.samples) / SAMPLE_RATE, 3)
        self.warnings = decoded.warnings
        self.log("audio", level="warning" if decoded.warnings else "info",
                 seconds=self.figures["decode_audio_seconds"], audio_seconds=self.figures["audio_seconds"],
                 warnings=[asdict(w) for w in decoded.warnings] or None)
        return decoded.samples

    # ------------------------------------------------------------------ 3. outputs
    def commit(self, transcript: Transcript, *, model_name: str, extra_figures: Mapping[str, Any]) -> None:
        """Render every output, upload them with the marker LAST, then drop a stale error marker.

        ``extra_figures``: job-level figures to record with this object (model load, utilization).
        """
        s3, bucket = self.rt.s3, self.dst.bucket
        figures = self.figures
        figures.update(extra_figures)
        processing = figures.get("decode_audio_seconds", 0.0) + sum(transcript.timings.values())
        figures["processing_seconds"] = round(processing, 3)
        audio_s = figures.get("audio_seconds") or transcript.duration
        figures["real_time_factor"] = round(processing / audio_s, 4) if audio_s else None
        self.log("transcribed", seconds=round(processing - figures.get("decode_audio_seconds", 0.0), 3),
                 real_time_factor=figures["real_time_factor"], segments=len(transcript.segments))
        ctx = self.rt.context
        job_block = {**figures, "worker_version": __version__, "model": model_name,
                     "job_id": ctx.job_id, "attempt": ctx.attempt,
                     "job_seconds": round(time.monotonic() - self.rt.started, 3),
                     "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        job_block["cost"] = cost_block(self.rt.settings, processing, figures.get("model_load_seconds"),
                                       (self.rt.pack or {}).get("objects") or 1)
        extra: dict[str, Any] = {"source": self.source, "job": job_block,
                                 "warnings": [asdict(w) for w in self.warnings]}
        if self.rt.pack is not None:
            extra["pack"] = dict(self.rt.pack)
        cue_options = CueOptions.from_settings(self.rt.settings)
        bodies = {fmt: render(transcript, fmt, cue_options=cue_options) for fmt in self.formats}
        bodies["json"] = render(transcript, "json", extra=extra)
        self.upload_started = True
        if self.existing is not None:  # an older marker (another ETag) must not vouch for new files
            s3io.delete_keys(s3, bucket, [self.keys["json"]])
        for fmt in self.formats:
            s3io.put_text(s3, bucket, self.keys[fmt], bodies[fmt])
        self.rt.interrupts.check()
        with self.rt.interrupts.deferred():  # committed once the marker is in: finish the bookkeeping
            s3io.put_text(s3, bucket, self.keys["json"], bodies["json"],
                          metadata={"source-etag": self.source["etag"] or ""})
            outputs = [self.keys[f] for f in self.formats] + [self.keys["json"]]
            self.result = JobResult(exit_codes.OK, "succeeded", outputs=outputs, figures=dict(job_block),
                                    source=self.source)
            failed = s3io.delete_keys(s3, bucket, [self.error_key])
            self.log("uploaded", outputs=[f"s3://{bucket}/{k}" for k in outputs],
                     stale_error_marker_not_deleted=failed or None)
            self.emit_metrics(succeeded=True)
            self.log("done", status="succeeded", **{k: figures.get(k) for k in (
                "audio_seconds", "processing_seconds", "real_time_factor", "model_load_seconds")})

    # ------------------------------------------------------------------ 4. failure
    def fail(self, exc: BaseException) -> JobResult:
        """Record ``exc`` as this object's failure: no partial outputs, an error marker, metrics."""
        err, code = classify(exc, self.rt.interrupts)
        s3, bucket = self.rt.s3, self.dst.bucket
        detail: dict[str, Any] = {}
        if err.reason == "internal_error":
            detail["traceback"] = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))[-4000:]
        self.log("failed", level="error" if err.reason in _ERROR_LEVEL_REASONS else "warning",
                 reason=err.reason, message=err.message, retryable=err.retryable, exit_code=code, **detail)
        if self.upload_started:
            # No partial outputs: whatever this attempt may have written goes (marker included,
            # in case its PUT landed but the response was lost).
            failed = s3io.delete_keys(s3, bucket, self.keys.values())
            self.log("cleanup", level="error" if failed else "info", not_removed=failed or None,
                     removed=[f"s3://{bucket}/{k}" for k in self.keys.values()])
        marker = {
            "reason": err.reason, "message": err.message, "retryable": err.retryable, "exit_code": code,
            "source": self.source, "attempt": self.rt.context.attempt, "job_id": self.rt.context.job_id,
            "worker_version": __version__, "model": self.rt.settings.model,
            "failed_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        if self.rt.pack is not None:
            marker["pack"] = dict(self.rt.pack)
        try:
            s3io.put_text(s3, bucket, self.error_key, json.dumps(marker, ensure_ascii=False, indent=2) + "\n",
                          tags=ERROR_MARKER_TAGS)
            self.log("error_marker", marker=f"s3://{bucket}/{self.error_key}")
        except Exception as put_exc:  # the exit code still tells Batch what to do
            self.log("error_marker", level="error", message=f"cannot write error marker: {put_exc}")
        self.emit_metrics(succeeded=False, reason=err.reason)
        self.result = JobResult(code, "failed", reason=err.reason, message=err.message, source=self.source,
                                figures=dict(self.figures))
        return self.result

    # ------------------------------------------------------------------ metrics
    def emit_metrics(self, *, succeeded: bool, reason: str | None = None) -> None:
        figures = dict(self.figures)
        if self.rt.pack is not None:  # the pack loads the model once: its document carries that
            figures.pop("model_load_seconds", None)
        emit(self.rt, metrics.job_metrics(
            self.rt.settings, succeeded=succeeded, reason=reason, figures=figures,
            properties={"JobId": self.rt.context.job_id, "Attempt": self.rt.context.attempt,
                        "Input": self.input_uri, "WorkerVersion": __version__}))


def emit(rt: Runtime, m: metrics.JobMetrics) -> None:
    """Publish one metrics document the way the settings say; a problem is logged, never raised."""
    m.properties = {k: v for k, v in m.properties.items() if v is not None}
    problem = metrics.publish(m, rt.settings.metrics_mode, stream=rt.metrics_stream, cloudwatch=rt.cloudwatch)
    if problem:
        rt.log("metrics", level="warning", message=problem)


def cost_block(settings: Settings, processing_seconds: float, model_load_seconds: float | None,
               pack_objects: int, instance_type: str | None = None) -> dict[str, Any]:
    """This object's share of instance time: its own wall seconds plus model load / objects in the pack.

    The price is looked up once (for the whole pack share) and multiplied twice. ``instance_type``
    defaults to the setting, else IMDSv2's answer (:func:`pricing.instance_type_from_imds`).
    """
    load_share = (model_load_seconds or 0.0) / max(pack_objects, 1)
    itype, why = (instance_type, "") if instance_type is not None else pricing.resolve_instance_type(settings.instance_type)
    unit = pricing.object_cost(3600.0, itype, settings.instance_price_per_hour, settings.jobs_per_instance)
    per_second = None if unit.usd is None else unit.usd_per_hour / unit.jobs_per_instance / 3600.0
    own = None if per_second is None else round(processing_seconds * per_second, 8)
    load = None if per_second is None else round(load_share * per_second, 8)
    return {"wall_seconds": round(processing_seconds, 3), "model_load_share_seconds": round(load_share, 3),
            "usd": own, "model_load_usd": load,
            "total_usd": None if own is None or load is None else round(own + load, 8),
            "instance_type": itype or None, "usd_per_hour": unit.usd_per_hour,
            "jobs_per_instance": unit.jobs_per_instance, "prices_as_of": pricing.PRICES_AS_OF,
            "reason": "; ".join(x for x in (why, unit.reason) if x) or None}
