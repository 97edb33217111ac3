"""One object -> one Batch job: naming, sizing, SubmitJob, and the idempotency around it.

Used by both entry points (the Lambda handler in :mod:`submitter.app` and the bulk CLI in
:mod:`submitter.bulk`), so both apply the same rules and share the same idempotency records.

Idempotency
    powertools' ``idempotent_function`` over a ``DynamoDBPersistenceLayer`` on
    ``IDEMPOTENCY_TABLE``; the key is ``[bucket, key, etag]`` under the fixed prefix
    :data:`IDEMPOTENCY_KEY_PREFIX` (NOT the Lambda function name, so the bulk CLI and every
    deployment of the handler see each other's records). A duplicate delivery, or a re-upload
    of identical bytes (same ETag) within ``IDEMPOTENCY_EXPIRES_SECONDS``, returns the stored
    job instead of submitting another. When SubmitJob raises, powertools deletes the
    in-progress record before re-raising, so the retry is not blocked. If the process dies
    mid-submit, the in-progress record expires with the invocation's remaining time (the
    handler registers the Lambda context) and the retry proceeds.

Clients
    :class:`Clients` holds the three clients the submitter talks to. ``batch`` may be any object
    with ``submit_job(**kwargs) -> {"jobId": ..., "jobName": ...}`` (local mode passes its
    own stand-in); ``s3`` and ``dynamodb`` are boto3 clients, which honour ``AWS_ENDPOINT_URL``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from submitter import rules

if TYPE_CHECKING:  # pragma: no cover
    from submitter.settings import SubmitterSettings

#: Partition-key prefix of every idempotency record (shared by handler and bulk CLI).
IDEMPOTENCY_KEY_PREFIX = "whisper-batch-submit"
#: jmespath over :class:`ObjectRef` (as a dict): what makes two deliveries "the same object content".
IDEMPOTENCY_KEY_JMESPATH = "[bucket, key, etag]"
#: Tags on every job (propagated to the ECS task for cost allocation).
JOB_TAGS = {"project": "whisper-batch", "component": "submitter"}

_MAX_JOB_NAME = 128
_HASH_CHARS = 12
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


@dataclass(frozen=True)
class ObjectRef:
    """An S3 object to transcribe. ``key`` is decoded (never URL-encoded); ``etag`` unquoted."""

    bucket: str
    key: str
    etag: str = ""
    size: int | None = None
    version_id: str | None = None

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.key}"


@dataclass
class Clients:
    """The clients the submitter uses; see the module docstring. Build with :meth:`create`."""

    batch: Any
    s3: Any
    dynamodb: Any

    @classmethod
    def create(cls, *, batch: Any = None, s3: Any = None, dynamodb: Any = None,
               session: Any = None) -> Clients:
        """boto3 clients (standard retry mode, bounded timeouts) for whatever is not given."""
        import boto3
        from botocore.config import Config

        session = session or boto3.session.Session()
        config = Config(
            retries={"mode": "standard", "max_attempts": 5},  # SubmitJob throttling backs off
            connect_timeout=5,
            read_timeout=15,
        )
        return cls(
            batch=batch if batch is not None else session.client("batch", config=config),
            s3=s3 if s3 is not None else session.client("s3", config=config),
            dynamodb=dynamodb if dynamodb is not None else session.client("dynamodb", config=config),
        )


@dataclass(frozen=True)
class Outcome:
    """What happened to one object: ``submitted``, ``duplicate`` or ``skipped`` (with ``reason``)."""

    obj: ObjectRef
    status: str
    reason: str | None = None
    job_id: str | None = None
    job_name: str | None = None
    job_definition: str | None = None


# --------------------------------------------------------------------------------------------
# Pure helpers
# --------------------------------------------------------------------------------------------

def normalize_etag(etag: str | None) -> str:
    """ETags arrive quoted from HeadObject/ListObjects and unquoted in notifications."""
    return (etag or "").strip().strip('"')


def short_hash(*parts: str, chars: int = _HASH_CHARS) -> str:
    digest = hashlib.sha256("\x00".join(parts).encode("utf-8")).hexdigest()
    return digest[:chars]


def readable_slug(text: str, max_len: int) -> str:
    """``text`` reduced to ``[A-Za-z0-9_-]`` (accents dropped, other runs -> ``_``)."""
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    slug = _UNSAFE.sub("_", ascii_text).strip("_-")
    return slug[:max_len].rstrip("_-")


def job_name(bucket: str, key: str, etag: str) -> str:
    """Batch job name: readable basename + a hash of bucket/key/etag, e.g.
    ``meeting_2024-03-01_mp3-1a2b3c4d5e6f``. At most 128 chars of ``[A-Za-z0-9_-]``, starting
    with a letter or digit (Batch's rule)."""
    suffix = short_hash(bucket, key, normalize_etag(etag))
    basename = key.rsplit("/", 1)[-1] or key
    slug = readable_slug(basename, _MAX_JOB_NAME - len(suffix) - 1) or "audio"
    if not slug[0].isalnum():  # pragma: no cover - readable_slug strips _ and -
        slug = "a" + slug
    return f"{slug}-{suffix}"[:_MAX_JOB_NAME]


def output_uri(bucket: str, settings: SubmitterSettings) -> str:
    return f"s3://{bucket}/{settings.output_prefix}"


def job_definition_for(size: int | None, settings: SubmitterSettings) -> str:
    """The long-timeout definition for objects of at least ``LONG_JOB_MIN_BYTES``."""
    if size is not None and size >= settings.long_job_min_bytes:
        return settings.job_definition_long
    return settings.job_definition


def submit_job_request(obj: ObjectRef, settings: SubmitterSettings, *, source: str = "lambda") -> dict:
    """Keyword arguments of ``SubmitJob`` for one object. Bucket and key travel only as
    parameters (``Ref::input``/``Ref::output`` in the job definition, never through a shell)."""
    return {
        "jobName": job_name(obj.bucket, obj.key, obj.etag),
        "jobQueue": settings.job_queue,
        "jobDefinition": job_definition_for(obj.size, settings),
        "parameters": {"input": obj.uri, "output": output_uri(obj.bucket, settings)},
        "tags": {**JOB_TAGS, "source": source},
        "propagateTags": True,
    }


# --------------------------------------------------------------------------------------------
# The submitter
# --------------------------------------------------------------------------------------------

class Submitter:
    """Applies the rules to one object and submits it exactly once (per bucket/key/ETag)."""

    def __init__(self, settings: SubmitterSettings, clients: Clients, *, source: str = "lambda",
                 persistence: Any = None) -> None:
        from aws_lambda_powertools.utilities.idempotency import (
            DynamoDBPersistenceLayer,
            IdempotencyConfig,
            idempotent_function,
        )

        self.settings = settings
        self.clients = clients
        self.source = source
        self.idempotency_config = IdempotencyConfig(
            event_key_jmespath=IDEMPOTENCY_KEY_JMESPATH,
            raise_on_no_idempotency_key=True,
            expires_after_seconds=settings.idempotency_expires_seconds,
            response_hook=_mark_duplicate,
        )
        self.persistence = persistence or DynamoDBPersistenceLayer(
            table_name=settings.idempotency_table, boto3_client=clients.dynamodb,
        )
        self.persistence.configure(self.idempotency_config, key_prefix=IDEMPOTENCY_KEY_PREFIX)
        self._idempotent_submit: Callable[..., dict] = idempotent_function(
            self._submit,
            data_keyword_argument="obj",
            persistence_store=self.persistence,
            config=self.idempotency_config,
            key_prefix=IDEMPOTENCY_KEY_PREFIX,
        )

    def register_lambda_context(self, context: Any) -> None:
        """Lets in-progress records expire with the invocation (a crash never blocks a retry)."""
        self.idempotency_config.register_lambda_context(context)

    # -- rules ---------------------------------------------------------------------------------
    def resolve(self, obj: ObjectRef) -> ObjectRef:
        """Fill in size/ETag with HeadObject when the event did not carry them."""
        if obj.size is not None and obj.etag:
            return obj
        kwargs: dict[str, Any] = {"Bucket": obj.bucket, "Key": obj.key}
        if obj.version_id:
            kwargs["VersionId"] = obj.version_id
        head = self.clients.s3.head_object(**kwargs)
        return dataclasses.replace(
            obj,
            size=int(head["ContentLength"]) if obj.size is None else obj.size,
            etag=obj.etag or normalize_etag(head.get("ETag")),
        )

    def check(self, obj: ObjectRef) -> tuple[ObjectRef, str | None]:
        """``(resolved object, skip reason or None)``; HeadObject only if the key rules pass."""
        reason = rules.key_skip_reason(obj.key, self.settings)
        if reason is not None:
            return obj, reason
        try:
            obj = self.resolve(obj)
        except Exception as exc:  # botocore ClientError; anything else propagates (retry)
            code = str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))
            if code in {"404", "NoSuchKey", "NotFound", "NoSuchVersion"}:
                return obj, rules.NOT_FOUND
            raise
        return obj, rules.size_skip_reason(int(obj.size or 0), self.settings)

    # -- submission ----------------------------------------------------------------------------
    def process(self, obj: ObjectRef) -> Outcome:
        """Skip, or submit exactly once. Raises when SubmitJob (or DynamoDB) fails."""
        obj, reason = self.check(obj)
        if reason is not None:
            return Outcome(obj, "skipped", reason=reason)
        return self.submit(obj)

    def submit(self, obj: ObjectRef) -> Outcome:
        """Idempotent SubmitJob for an object that passed the rules."""
        response = self._idempotent_submit(obj=obj)
        duplicate = bool(response.pop("_duplicate", False))
        return Outcome(
            obj,
            "duplicate" if duplicate else "submitted",
            reason=rules.DUPLICATE if duplicate else None,
            job_id=response.get("jobId"),
            job_name=response.get("jobName"),
            job_definition=response.get("jobDefinition"),
        )

    def _submit(self, obj: ObjectRef) -> dict:
        request = submit_job_request(obj, self.settings, source=self.source)
        response = self.clients.batch.submit_job(**request)
        return {
            "jobId": response["jobId"],
            "jobName": response.get("jobName", request["jobName"]),
            "jobDefinition": request["jobDefinition"],
        }

    # -- claims for array jobs (bulk) --------------------------------------------------------------
    def claim(self, obj: ObjectRef, hold_seconds: int = 3600) -> dict | None:
        """Take the idempotency record of ``obj`` for a job submitted outside :meth:`submit`
        (an array-job element). Returns ``None`` when claimed, or the stored response (a dict,
        possibly ``{}``) when another submission holds or completed it."""
        from aws_lambda_powertools.utilities.idempotency.exceptions import (
            IdempotencyItemAlreadyExistsError,
        )

        data = dataclasses.asdict(obj)
        try:
            self.persistence.save_inprogress(data=data, remaining_time_in_millis=hold_seconds * 1000)
        except IdempotencyItemAlreadyExistsError as exc:
            record = exc.old_data_record
            if record is None:
                try:
                    record = self.persistence.get_record(data=data)
                except Exception:  # deleted meanwhile: treat as held, the next run decides
                    return {}
            return record.response_json_as_dict() or {"status": record.status}
        return None

    def complete(self, obj: ObjectRef, response: dict) -> None:
        self.persistence.save_success(data=dataclasses.asdict(obj), result=response)

    def release(self, obj: ObjectRef, exc: Exception) -> None:
        self.persistence.delete_record(data=dataclasses.asdict(obj), exception=exc)


def _mark_duplicate(response: Any, data_record: Any) -> Any:
    """powertools response hook: runs only when the response comes from the idempotency store."""
    if isinstance(response, dict):
        return {**response, "_duplicate": True}
    return {"_duplicate": True}
