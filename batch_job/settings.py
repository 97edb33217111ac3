"""One settings object for the worker, read once from the environment.

Every knob of the worker lives here, with its default and the environment variable
that overrides it (``WHISPER_BATCH_<FIELD>`` upper-cased, e.g. ``WHISPER_BATCH_BATCH_SIZE``).
Nothing else in ``batch_job`` reads ``os.environ`` for configuration (SageMaker's own port
variable is read here too: :func:`serve_port`). CLI flags
override settings through :meth:`Settings.replace`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

ENV_PREFIX = "WHISPER_BATCH_"


def usable_cores() -> int:
    """Cores this process may run on (affinity/cgroup-cpuset aware): the default thread and worker count."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def _default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return str(Path(base) / "whisper-batch")


@dataclass(frozen=True)
class Settings:
    """Worker configuration. Field docs name the env var that sets them."""

    # --- model and engine -------------------------------------------------
    model: str = "tiny.en"
    """Model: ``tiny.en``, ``base``, a transformers checkpoint or CTranslate2 (faster-whisper) directory, or a hub id (image build)."""
    device: str = "auto"
    """``auto`` (neuron if present, else cuda, else cpu), ``cpu``, ``cuda`` or ``neuron``."""
    batch_size: int = 8
    """Windows per encoder/decoder batch; the batch is padded to exactly this size."""
    max_new_tokens: int = 224
    """Static KV cache length for generated tokens per window (Whisper's limit is 448 incl. prompt)."""
    compiled_dir: str = ""
    """Directory of compiled Neuron graphs (with manifest.json); empty = compile nothing, run eager."""
    cache_dir: str = field(default_factory=_default_cache_dir)
    """Where converted model checkpoints are cached."""
    threads: int = 0
    """torch intra-op threads; 0 = one per available core."""
    jit_decoder: bool = True
    """CPU/CUDA: ``torch.jit.trace`` the decoder step per batch size on first use (less per-step overhead)."""
    quantize_decoder: bool = True
    """CPU only: dynamic int8 quantization of the decoder's Linear layers."""
    encoder_dtype: str = "auto"
    """CPU only: the encoder's compute dtype, ``float32`` or ``bfloat16``; ``auto`` = bfloat16 where
    the CPU multiplies bf16 natively (AVX512-BF16 / AMX, as oneDNN reports), else float32."""
    share_rows: bool = False
    """Short windows of different files share one encoder row (one 30 s encoder pass for several
    short files; docs/engine.md). On by default for Batch jobs (``run-job``, so packs and local
    mode: :meth:`for_batch_job`), off elsewhere (``transcribe``); the server never shares rows
    between requests. Only with a known language (fixed, or an English-only model) and without
    word timestamps."""
    word_timestamps: bool = False
    """Word-level timestamps (``segments[].words`` in the JSON; subtitle cues timed by word). The step
    graphs also return the alignment heads' attention; on Neuron the graphs must be compiled with
    ``--word-timestamps``."""

    # --- inputs -----------------------------------------------------------
    max_audio_seconds: float = 4 * 3600.0
    """Longest audio accepted; longer gives reason ``too_long``."""
    max_download_bytes: int = 2 * 1024**3
    """Largest object the job downloads; larger gives reason ``too_large``."""
    work_dir: str = ""
    """Scratch directory for downloads (empty = system temp dir)."""

    # --- job I/O ----------------------------------------------------------
    input_uri: str = ""
    """Default ``--input`` for run-job (``s3://bucket/key``)."""
    output_uri: str = ""
    """Default ``--output`` for run-job (``s3://bucket/prefix/``)."""
    formats: str = "json,txt,srt,vtt"
    """Output formats, comma-separated."""
    max_line_width: int = 42
    """SRT/VTT: characters per subtitle line (words are never cut)."""
    max_line_count: int = 2
    """SRT/VTT: lines per cue."""
    max_cue_seconds: float = 7.0
    """SRT/VTT: longest cue, where word times allow splitting."""
    vtt_word_level: bool = False
    """VTT: a ``<hh:mm:ss.mmm>`` timestamp tag before each word (needs ``word_timestamps``)."""
    s3_max_attempts: int = 5
    """botocore retry attempts for S3 calls (standard mode)."""
    download_attempts: int = 3
    """run-job: attempts of the whole input download (each on top of botocore's own retries)."""
    manifest_uri: str = ""
    """run-job array jobs: ``s3://`` JSON-lines manifest; line ``AWS_BATCH_JOB_ARRAY_INDEX`` is the input."""
    language: str = ""
    """run-job default ``--language`` (empty = detect / model default)."""
    task: str = "transcribe"
    """run-job default ``--task``: ``transcribe`` or ``translate``."""

    # --- speaker labels (diarization) ---------------------------------------
    diarize: bool = False
    """Label who speaks: ``speaker`` on JSON segments and words, turns in TXT, labelled SRT cues, VTT
    voice tags. Turns word timestamps on. Off = nothing loaded, outputs as without it."""
    speakers: str = "auto"
    """Speaker count: ``auto`` (estimated within ``min_speakers``..``max_speakers``) or a number."""
    min_speakers: int = 1
    """Fewest speakers ``auto`` may find."""
    max_speakers: int = 8
    """Most speakers ``auto`` may find."""

    # --- serving (whisper-batch serve) -------------------------------------
    serve_max_queue: int = 64
    """Requests the server holds at once (decoding or waiting); one more gets 503 with ``Retry-After``."""
    serve_batch_wait_ms: float = 10.0
    """Gathering window: an idle engine waits this long for more requests to share its first batch."""
    serve_max_body_mb: float = 100.0
    """Largest request body (MB); larger gives 413 ``too_large``. SageMaker's own caps are lower for
    real-time (6 MB) and serverless (4 MB) endpoints: docs/serving.md."""
    serve_drain_seconds: float = 60.0
    """On SIGTERM: how long requests in flight may take to finish before the server stops anyway."""

    # --- cost (completion markers' ``cost`` block, whisper-batch status) -----
    instance_type: str = ""
    """EC2 instance type the job runs on; empty = asked from the instance metadata service (IMDSv2)."""
    instance_price_per_hour: float = 0.0
    """On-demand USD per instance hour; 0 = from the package's price table for ``instance_type``."""
    jobs_per_instance: int = 0
    """Jobs sharing one instance (its cost is split between them); 0 = from the instance type."""

    # --- metrics ----------------------------------------------------------
    metrics_namespace: str = "WhisperBatch"
    """CloudWatch namespace for job metrics."""
    metrics_service: str = "whisper-batch"
    """Value of the ``Service`` dimension on every metric."""
    metrics_mode: str = "emf"
    """``emf`` (Embedded Metric Format on stdout), ``put`` (PutMetricData) or ``off``."""
    neuron_monitor: str = "neuron-monitor"
    """neuron-monitor executable; sampled during a job when found on PATH."""
    neuron_monitor_period: float = 1.0
    """Seconds between neuron-monitor reports while a job runs."""

    def __post_init__(self) -> None:
        # Speaker labels are given per word: diarization needs word timestamps, so it turns them on.
        if self.diarize and not self.word_timestamps:
            object.__setattr__(self, "word_timestamps", True)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Build settings from ``WHISPER_BATCH_*`` variables, then apply keyword overrides.

        Raises ``ValueError`` naming the variable when a value has the wrong type.
        """
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            name = ENV_PREFIX + f.name.upper()
            if name in env:
                values[f.name] = _coerce(name, env[name], f.type)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    @classmethod
    def for_batch_job(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """:meth:`from_env` with a Batch job's own defaults (:data:`BATCH_JOB_DEFAULTS`) where the
        environment sets none of those variables: ``WHISPER_BATCH_SHARE_ROWS=0`` still turns
        shared rows off for a job."""
        env = os.environ if environ is None else environ
        defaults = {k: v for k, v in BATCH_JOB_DEFAULTS.items() if ENV_PREFIX + k.upper() not in env}
        return cls.from_env(env, **{**defaults, **{k: v for k, v in overrides.items() if v is not None}})

    def replace(self, **changes: Any) -> Settings:
        """A copy with the given fields changed; ``None`` values are ignored (unset CLI flags)."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    @property
    def format_list(self) -> tuple[str, ...]:
        return tuple(f.strip().lower() for f in self.formats.split(",") if f.strip())


BATCH_JOB_DEFAULTS: dict[str, Any] = {"share_rows": True}
"""Defaults of ``run-job`` that differ from :class:`Settings`' own: shared encoder rows (many short
files per pack; 40 clips end to end 15.2 s with them, 16.1 s without, docs/benchmarks.md)."""


def _coerce(name: str, raw: str, type_name: Any) -> Any:
    type_name = str(type_name)
    try:
        if type_name == "bool":
            lowered = raw.strip().lower()
            if lowered in {"1", "true", "yes", "on"}:
                return True
            if lowered in {"0", "false", "no", "off", ""}:
                return False
            raise ValueError(raw)
        if type_name == "int":
            return int(raw)
        if type_name == "float":
            return float(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a valid {type_name}") from None
    return raw


SAGEMAKER_PORT_VARIABLE = "SAGEMAKER_BIND_TO_PORT"
"""SageMaker tells a serving container its port in this variable (8080 when unset)."""
DEFAULT_SERVE_PORT = 8080


def serve_port(environ: Mapping[str, str] | None = None) -> int:
    """The port ``whisper-batch serve`` listens on: ``$SAGEMAKER_BIND_TO_PORT``, else 8080."""
    env = os.environ if environ is None else environ
    raw = env.get(SAGEMAKER_PORT_VARIABLE, "").strip()
    return int(_coerce(SAGEMAKER_PORT_VARIABLE, raw, "int")) if raw else DEFAULT_SERVE_PORT
