"""Submitter configuration: environment variables set by the stack, validated once at cold start.

``SubmitterSettings.from_env()`` reads every variable, collects *all* problems and raises one
:class:`SettingsError` that lists them, so a mis-deployed stack fails at init with a message
that names everything to fix (instead of failing on the first object, one variable at a time).

| variable              | required | meaning                                                        |
|-----------------------|----------|----------------------------------------------------------------|
| ``JOB_QUEUE``         | yes      | Batch job queue name or ARN                                    |
| ``JOB_DEFINITION``    | yes      | job definition (name, name:revision or ARN) for normal objects |
| ``JOB_DEFINITION_LONG`` | yes    | job definition with the longer timeout, for big objects        |
| ``LONG_JOB_MIN_BYTES``| yes      | objects of at least this many bytes use ``JOB_DEFINITION_LONG``|
| ``MAX_OBJECT_BYTES``  | yes      | larger objects are skipped (reason ``too_large``)              |
| ``INPUT_PREFIX``      | no ("")  | only keys under it are submitted; empty = the whole bucket     |
| ``OUTPUT_PREFIX``     | yes      | where the worker writes; never submitted (no trigger loops)    |
| ``IDEMPOTENCY_TABLE`` | yes      | DynamoDB table of the powertools idempotency layer (pk ``id``) |
| ``IDEMPOTENCY_EXPIRES_SECONDS`` | no (7 days) | how long a bucket/key/ETag stays "already submitted" |

This module has no third-party imports (the bulk CLI and tests use it without powertools).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

#: Default lifetime of an idempotency record: a re-upload of identical bytes to the same key
#: within this window does not start a second job.
DEFAULT_IDEMPOTENCY_EXPIRES_SECONDS = 7 * 24 * 3600


class SettingsError(ValueError):
    """The environment does not describe a usable submitter; ``problems`` lists every issue."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__(
            "invalid submitter configuration (" + str(len(self.problems)) + " problem"
            + ("s" if len(self.problems) != 1 else "") + "):\n  - " + "\n  - ".join(self.problems)
        )


@dataclass(frozen=True)
class SubmitterSettings:
    """Validated submitter configuration (see the module docstring for the variables)."""

    job_queue: str
    job_definition: str
    job_definition_long: str
    long_job_min_bytes: int
    max_object_bytes: int
    input_prefix: str
    output_prefix: str
    idempotency_table: str
    idempotency_expires_seconds: int = DEFAULT_IDEMPOTENCY_EXPIRES_SECONDS

    #: env var -> (field, kind, required)
    _ENV = (
        ("JOB_QUEUE", "job_queue", "str", True),
        ("JOB_DEFINITION", "job_definition", "str", True),
        ("JOB_DEFINITION_LONG", "job_definition_long", "str", True),
        ("LONG_JOB_MIN_BYTES", "long_job_min_bytes", "int", True),
        ("MAX_OBJECT_BYTES", "max_object_bytes", "int", True),
        ("INPUT_PREFIX", "input_prefix", "prefix", False),
        ("OUTPUT_PREFIX", "output_prefix", "prefix", True),
        ("IDEMPOTENCY_TABLE", "idempotency_table", "str", True),
        ("IDEMPOTENCY_EXPIRES_SECONDS", "idempotency_expires_seconds", "int", False),
    )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> SubmitterSettings:
        """Read and validate the variables; keyword ``overrides`` (field names, ``None`` = unset)
        take precedence over the environment (the bulk CLI's flags).

        Raises :class:`SettingsError` listing every missing or invalid variable.
        """
        env = os.environ if environ is None else environ
        problems: list[str] = []
        values: dict[str, Any] = {}
        for var, field_name, kind, required in cls._ENV:
            raw = overrides.get(field_name)
            raw = env.get(var) if raw is None else raw
            if raw is None or (isinstance(raw, str) and raw.strip() == "" and kind != "prefix"):
                if required:
                    problems.append(f"{var} is not set")
                continue
            if kind == "int":
                try:
                    number = int(str(raw).strip())
                except ValueError:
                    problems.append(f"{var}={raw!r} is not an integer (bytes/seconds)")
                    continue
                if number <= 0:
                    problems.append(f"{var}={raw!r} must be a positive integer")
                    continue
                values[field_name] = number
            elif kind == "prefix":
                prefix = str(raw)
                if prefix.startswith("/"):
                    problems.append(f"{var}={raw!r} must not start with '/' (S3 keys have no leading slash)")
                    continue
                values[field_name] = prefix
            else:
                values[field_name] = str(raw).strip()
        values.setdefault("input_prefix", "")

        output_prefix = values.get("output_prefix")
        if output_prefix is not None:
            if output_prefix == "":
                problems.append("OUTPUT_PREFIX must not be empty (outputs would re-trigger the submitter)")
            elif values["input_prefix"].startswith(output_prefix):
                problems.append(
                    f"INPUT_PREFIX={values['input_prefix']!r} lies under OUTPUT_PREFIX={output_prefix!r}: "
                    "every input would be skipped as an output"
                )
        if problems:
            raise SettingsError(problems)
        return cls(**values)

    def replace(self, **changes: Any) -> SubmitterSettings:
        """A copy with the given fields changed (tests, local mode)."""
        return replace(self, **changes)
