"""Process exit codes of ``whisper-batch run-job``; the job definition's RetryStrategy matches on them.

The values follow BSD ``sysexits.h`` so they never collide with Python's own 1 (uncaught
exception) or 2 (argparse usage error) or the shell's 128+N signal codes.

| code | name          | meaning                                           | Batch RetryStrategy |
|------|---------------|---------------------------------------------------|---------------------|
| 0    | OK            | transcribed, or already done (idempotent skip)    | -                   |
| 65   | INPUT_ERROR   | bad input (corrupt, empty, unsupported, too long) | EXIT (never retry)  |
| 78   | CONFIG_ERROR  | model/graphs/settings broken in this image        | EXIT (never retry)  |
| 75   | TRANSIENT     | S3 error, SIGTERM (Spot reclaim, cancel), NeuronCore busy/unloadable | RETRY |
| 70   | INTERNAL      | unexpected bug; retried in case it was transient  | RETRY               |
"""

from __future__ import annotations

from batch_job.errors import WhisperBatchError

OK = 0
INPUT_ERROR = 65
INTERNAL = 70
TRANSIENT = 75
CONFIG_ERROR = 78

#: Exit codes the job definition retries (kept in sync with cloudformation/template.yaml by a test).
RETRYABLE = frozenset({TRANSIENT, INTERNAL})
#: Exit codes that must never be retried.
PERMANENT = frozenset({INPUT_ERROR, CONFIG_ERROR})


def for_error(exc: BaseException) -> int:
    """Map an exception to the exit code the job must end with."""
    from batch_job.errors import AudioError, ConfigError, ModelError

    if isinstance(exc, AudioError):
        return INPUT_ERROR
    if isinstance(exc, (ModelError, ConfigError)):
        return CONFIG_ERROR
    if isinstance(exc, WhisperBatchError):
        return TRANSIENT if exc.retryable else INPUT_ERROR
    return INTERNAL
