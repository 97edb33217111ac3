"""What AWS Batch tells the container about the job, and what a job reports back per object."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


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


@dataclass(frozen=True)
class JobResult:
    """One object's outcome; ``exit_code`` is what a job of this object alone must exit with."""

    exit_code: int
    status: str  # "succeeded" | "skipped" | "failed"
    reason: str | None = None
    message: str | None = None
    outputs: list[str] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)
    source: dict[str, Any] | None = None


@dataclass(frozen=True)
class PackResult:
    """A whole job's outcome: one :class:`JobResult` per object (input order) and the pack's figures."""

    exit_code: int
    objects: list[JobResult]
    figures: dict[str, Any] = field(default_factory=dict)
