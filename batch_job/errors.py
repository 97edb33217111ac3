"""Error types shared by the engine, the Batch job and the CLI.

Every failure the worker can explain carries a machine-readable ``reason`` code
(written to ``<key>.error.json`` by the Batch job) and a flag telling whether a
retry could help. Exit codes live in :mod:`batch_job.exit_codes`.
"""

from __future__ import annotations


class WhisperBatchError(Exception):
    """Base class: ``reason`` is a stable snake_case code, ``retryable`` says if a retry may help."""

    reason: str = "internal_error"
    retryable: bool = True

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason

    @property
    def message(self) -> str:
        return str(self)


class AudioError(WhisperBatchError):
    """The input file cannot be turned into audio. Permanent: retrying gives the same answer."""

    reason = "corrupt_audio"
    retryable = False


class UnsupportedFormatError(AudioError):
    """The container or codec is not one we can decode (or ffmpeg is missing for it)."""

    reason = "unsupported_format"


class CorruptAudioError(AudioError):
    """The file claims a supported format but its bytes cannot be decoded."""

    reason = "corrupt_audio"


class EmptyAudioError(AudioError):
    """The file decodes to no samples at all."""

    reason = "empty_audio"


class TooLongError(AudioError):
    """The audio is longer than the configured maximum duration."""

    reason = "too_long"


class TooLargeError(AudioError):
    """The object is larger than the configured maximum download size."""

    reason = "too_large"


class MissingInputError(WhisperBatchError):
    """The input object does not exist (deleted before the job ran). Permanent: exit code 65."""

    reason = "missing_input"
    retryable = False


class ModelError(WhisperBatchError):
    """The model or its compiled graphs cannot be loaded or do not match. Permanent for this image."""

    reason = "model_error"
    retryable = False


class DeviceError(WhisperBatchError):
    """The accelerator runtime could not load or place the graphs (no free NeuronCore, device
    memory, a driver hiccup). Transient: exit code 75, the job is retried, maybe on another host."""

    reason = "device_unavailable"
    retryable = True


class StorageError(WhisperBatchError):
    """S3 (or the local stand-in) failed after retries. Transient."""

    reason = "s3_error"
    retryable = True


class InterruptedJobError(WhisperBatchError):
    """The job received SIGTERM/SIGINT (Spot reclaim, cancel, timeout). Transient."""

    reason = "interrupted"
    retryable = True


class ConfigError(WhisperBatchError):
    """Bad job parameters or settings (URI, formats, manifest). Permanent: exit code 78."""

    reason = "config_error"
    retryable = False
