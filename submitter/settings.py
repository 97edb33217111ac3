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
| ``PACK_MAX_OBJECTS``  | no (50)  | objects per pack job; 1 = one job per object                  |
| ``PACK_MAX_BYTES``    | no (512 MiB) | bytes per pack job                                         |
| ``PACK_MAX_AUDIO_SECONDS`` | no (7200) | estimated audio seconds per pack job (:mod:`submitter.packs`) |
| ``PACK_PARALLELISM``  | no (1)   | an invocation's objects go to at least min(this, n) packs      |

The pack bounds keep one pack's job well inside its attempt timeout; objects that do not fit
(``LONG_JOB_MIN_BYTES`` or more, or more estimated audio than ``PACK_MAX_AUDIO_SECONDS``) get a
job of their own. ``PACK_PARALLELISM`` is the number of job slots a burst should spread over
(the stack: the two NeuronCores of one inf2.xlarge; local mode: its worker count).

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
#: Pack bounds (issue #11). 50 short files amortise one job start over enough work; 512 MiB and
#: 2 h of (over-)estimated audio keep a pack's job far inside the 1 h standard attempt timeout.
DEFAULT_PACK_MAX_OBJECTS = 50
DEFAULT_PACK_MAX_BYTES = 512 * 1024 * 1024
DEFAULT_PACK_MAX_AUDIO_SECONDS = 7200
DEFAULT_PACK_PARALLELISM = 1


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
    pack_max_objects: int = DEFAULT_PACK_MAX_OBJECTS
    pack_max_bytes: int = DEFAULT_PACK_MAX_BYTES
    pack_max_audio_seconds: int = DEFAULT_PACK_MAX_AUDIO_SECONDS
    pack_parallelism: int = DEFAULT_PACK_PARALLELISM

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
        ("PACK_MAX_OBJECTS", "pack_max_objects", "int", False),
        ("PACK_MAX_BYTES", "pack_max_bytes", "int", False),
        ("PACK_MAX_AUDIO_SECONDS", "pack_max_audio_seconds", "int", False),
        ("PACK_PARALLELISM", "pack_parallelism", "int", False),
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
