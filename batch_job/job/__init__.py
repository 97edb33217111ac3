"""``whisper-batch run-job``: an AWS Batch job = one S3 object, or a pack of them, through one model.

Modules, in the order a job uses them:

* :mod:`~batch_job.job.cli`       parameters -> the objects of this job (``--input`` an object, or a
                                  pack manifest read by :mod:`~batch_job.job.manifest`) -> exit code.
* :mod:`~batch_job.job.pack`      :func:`run_pack`: HEAD all, skip what is done, decode lazily, load
                                  the model once, batch windows across the pack's files, exit code.
* :mod:`~batch_job.job.objects`   :class:`ObjectJob`, one object's stages, its markers and metrics.
* :mod:`~batch_job.job.keys`      where outputs and markers go; :mod:`~batch_job.job.signals`
                                  SIGTERM handling; :mod:`~batch_job.job.log` the JSON log.

Every stage logs one JSON line on stderr (``{"stage": ..., "elapsed_s": <since process start>,
"input": ...}``): ``start``, ``head``, ``skip``, ``download``, ``audio``, ``model_ready``,
``first_window``/``progress``, ``transcribed``, ``uploaded``, ``done``; on failure ``failed``,
``cleanup``, ``error_marker``; a pack ends with ``pack_done``.

Outputs per object: ``P+K.txt/.srt/.vtt``, then ``P+K.json`` LAST (the completion marker: the
transcript plus ``source`` (bucket, key, ETag, VersionId), ``job`` (per-object figures below),
``warnings`` (e.g. ``truncated_audio``) and, in a pack, ``pack`` (manifest, objects)); then a stale
``P+K.error.json`` is deleted. A failure leaves no partial outputs and writes ``P+K.error.json``
``{reason, message, retryable, exit_code, source, attempt, job_id, ...}``.

SIGTERM/SIGINT raise :class:`~batch_job.errors.InterruptedJobError` in the main thread wherever the
job is: finished objects keep their outputs, the object being written loses its partial ones,
every unfinished object gets an ``interrupted`` error marker, exit 75. A marker being written is
finished first. A hard kill (SIGKILL) can leave outputs without a marker; only the ``.json``
marker means "done" and a retry overwrites them.

Per-object figures (marker ``job`` block and metrics): ``audio_seconds``; ``processing_seconds`` =
audio decode + this file's share of the model's time (no S3, no model load); ``real_time_factor``
= processing / audio seconds; ``model_load_seconds`` (the job's one load);
``neuroncore_utilization_avg``/``_peak`` when neuron-monitor sampled. A pack adds one metrics
document: PackObjects, PackAudioSeconds, PackWallSeconds, PackThroughput, ModelLoadSeconds.
"""

from batch_job.errors import ConfigError
from batch_job.job.cli import register
from batch_job.job.context import JobContext, JobResult, PackResult
from batch_job.job.keys import DEFAULT_OUTPUT_PREFIX, ERROR_MARKER_TAGS, error_marker_key, marker_key, output_key
from batch_job.job.log import JsonLog, process_age_seconds, process_start_time
from batch_job.job.manifest import PackEntry, is_manifest_uri, pack_entries, read_pack
from batch_job.job.pack import load_transcriber, run_job, run_pack

__all__ = [
    "DEFAULT_OUTPUT_PREFIX", "ERROR_MARKER_TAGS", "ConfigError", "JobContext", "JobResult", "JsonLog",
    "PackEntry", "PackResult", "error_marker_key", "is_manifest_uri", "load_transcriber", "marker_key",
    "output_key", "pack_entries", "process_age_seconds", "process_start_time", "read_pack", "register",
    "run_job", "run_pack",
]
