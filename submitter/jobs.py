"""Objects -> Batch jobs: naming, sizing, SubmitJob for packs, and the idempotency around it.

Used by both entry points (the Lambda handler in :mod:`submitter.app` and the bulk CLI in
:mod:`submitter.bulk`), so both apply the same rules, pack the same way (:mod:`submitter.packs`)
and share the same idempotency records.

Idempotency
    One powertools ``DynamoDBPersistenceLayer`` record per object on ``IDEMPOTENCY_TABLE``; the
    key is ``[bucket, key, etag]`` under the fixed prefix :data:`IDEMPOTENCY_KEY_PREFIX` (NOT the
    Lambda function name, so the bulk CLI and every deployment of the handler see each other's
    records). Every object is *claimed* (an in-progress record, conditional put) before its pack
    is submitted, *completed* with its job after, and *released* (deleted) when the pack's
    SubmitJob fails, so the retry is not blocked. A record completed within
    ``IDEMPOTENCY_EXPIRES_SECONDS`` (duplicate delivery, re-upload of identical bytes) makes the
    object a ``duplicate``; a record another submission holds in progress makes it ``failed``
    (retried: by then that submission has completed or released it). If the process dies
    mid-submit, the claim expires with the invocation's remaining time (the handler registers
    the Lambda context) and the retry proceeds.

Clients
    :class:`Clients` holds the three clients the submitter talks to. ``batch`` may be any object
    with ``submit_job(**kwargs) -> {"jobId": ..., "jobName": ...}`` (local mode passes its
    own stand-in); ``s3`` and ``dynamodb`` are boto3 clients, which honour ``AWS_ENDPOINT_URL``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from submitter import rules
from submitter.manifest import Manifest, build_manifest
from submitter.objects import ObjectRef, normalize_etag
from submitter.packs import Pack, job_definition_for, make_packs

if TYPE_CHECKING:  # pragma: no cover
    from submitter.settings import SubmitterSettings

#: Partition-key prefix of every idempotency record (shared by handler and bulk CLI).
IDEMPOTENCY_KEY_PREFIX = "whisper-batch-submit"
#: jmespath over :class:`ObjectRef` (as a dict): what makes two deliveries "the same object content".
IDEMPOTENCY_KEY_JMESPATH = "[bucket, key, etag]"
#: Tags on every job (propagated to the ECS task for cost allocation).
JOB_TAGS = {"project": "whisper-batch", "component": "submitter"}
#: How long a claim holds an object when no Lambda context says how long the caller has left
#: (the bulk CLI): long enough to claim, write and submit 10,000 objects.
DEFAULT_CLAIM_HOLD_SECONDS = 3600
#: Outcome statuses (the contract with local mode: docs/submitter.md, "Seam for local mode and tests").
SUBMITTED, DUPLICATE, SKIPPED, FAILED = "submitted", "duplicate", "skipped", "failed"

_log = logging.getLogger(__name__)

_MAX_JOB_NAME = 128
_HASH_CHARS = 12
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


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
    """What happened to one object.

    ``status``: ``submitted`` (in job ``job_id``), ``duplicate`` (already submitted: the stored
    job, when known), ``skipped`` (``reason`` from :mod:`submitter.rules`) or ``failed``
    (``error`` says why; the object is retried). ``manifest`` is the pack manifest's URI when
    the object shares its job with others, ``None`` for a job of its own. ``job_id`` of an
    array element is ``<array job id>:<index>``."""

    obj: ObjectRef
    status: str
    reason: str | None = None
    job_id: str | None = None
    job_name: str | None = None
    job_definition: str | None = None
    manifest: str | None = None
    error: str | None = None


# --------------------------------------------------------------------------------------------
# Pure helpers
# --------------------------------------------------------------------------------------------

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


def manifest_job_request(manifest: Manifest, settings: SubmitterSettings, *, name_prefix: str = "pack",
                         array_size: int | None = None, source: str = "lambda") -> dict:
    """Keyword arguments of ``SubmitJob`` for a job over a manifest: a pack job, or an array
    job of ``array_size`` packs. ``input`` is the manifest's URI, ``output`` the output prefix."""
    request: dict[str, Any] = {
        "jobName": f"{name_prefix}-{manifest.name}",
        "jobQueue": settings.job_queue,
        "jobDefinition": manifest.job_definition,
        "parameters": {"input": manifest.uri, "output": manifest.output},
        "tags": {**JOB_TAGS, "source": source},
        "propagateTags": True,
    }
    if array_size is not None:
        request["arrayProperties"] = {"size": array_size}
    return request


def describe_error(exc: BaseException) -> str:
    """``Outcome.error`` of an exception: its type and message, on one line."""
    return f"{type(exc).__name__}: {exc}".replace("\n", " ")




# --------------------------------------------------------------------------------------------
# The submitter
# --------------------------------------------------------------------------------------------

class Submitter:
    """Applies the rules, claims objects, submits their packs and records the jobs (see the
    module docstring). One per entry point; ``source`` tags the jobs (``lambda`` / ``bulk``)."""

    def __init__(self, settings: SubmitterSettings, clients: Clients, *, source: str = "lambda",
                 persistence: Any = None) -> None:
        from aws_lambda_powertools.utilities.idempotency import DynamoDBPersistenceLayer, IdempotencyConfig

        self.settings = settings
        self.clients = clients
        self.source = source
        self.idempotency_config = IdempotencyConfig(
            event_key_jmespath=IDEMPOTENCY_KEY_JMESPATH,
            raise_on_no_idempotency_key=True,
            expires_after_seconds=settings.idempotency_expires_seconds,
        )
        self.persistence = persistence or DynamoDBPersistenceLayer(
            table_name=settings.idempotency_table, boto3_client=clients.dynamodb,
        )
        self.persistence.configure(self.idempotency_config, key_prefix=IDEMPOTENCY_KEY_PREFIX)
        self._deadline: Any = None

    def register_lambda_context(self, context: Any) -> None:
        """Claims expire with the invocation (``context.get_remaining_time_in_millis()``), so a
        crash mid-submit never blocks the retry for longer than the invocation could have run."""
        self._deadline = context

    def claim_hold_millis(self) -> int:
        """How long a claim taken now holds its object."""
        if self._deadline is not None:
            return max(0, int(self._deadline.get_remaining_time_in_millis()))
        return DEFAULT_CLAIM_HOLD_SECONDS * 1000

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

    # -- idempotency records ---------------------------------------------------------------------
    def claim(self, obj: ObjectRef, hold_millis: int | None = None) -> dict | None:
        """Take the idempotency record of ``obj`` (an in-progress record held for ``hold_millis``,
        default :meth:`claim_hold_millis`). ``None`` when claimed; otherwise the record another
        submission holds: its stored response plus ``status`` (``COMPLETED`` or ``INPROGRESS``).
        Raises on a DynamoDB error."""
        from aws_lambda_powertools.utilities.idempotency.exceptions import (
            IdempotencyItemAlreadyExistsError,
            IdempotencyItemNotFoundError,
        )

        data = dataclasses.asdict(obj)
        hold = self.claim_hold_millis() if hold_millis is None else hold_millis
        try:
            self.persistence.save_inprogress(data=data, remaining_time_in_millis=hold)
        except IdempotencyItemAlreadyExistsError as exc:
            record = exc.old_data_record
            if record is None:
                try:
                    record = self.persistence.get_record(data=data)
                except IdempotencyItemNotFoundError:  # released meanwhile: its holder is retrying it
                    return {"status": "INPROGRESS"}
            return {**(record.response_json_as_dict() or {}), "status": record.status}
        return None

    def try_claim(self, obj: ObjectRef) -> Outcome | None:
        """:meth:`claim` as an outcome: ``None`` when claimed, ``duplicate`` when already
        submitted, ``failed`` when another submission holds it in progress or DynamoDB fails
        (the caller retries: by then the record is completed, released or expired)."""
        try:
            held = self.claim(obj)
        except Exception as exc:  # noqa: BLE001 - throttled or unavailable table: retry this object
            return Outcome(obj, FAILED, error=describe_error(exc))
        if held is None:
            return None
        if held.get("status") == "COMPLETED":
            return Outcome(obj, DUPLICATE, reason=rules.DUPLICATE, job_id=held.get("jobId"),
                           job_name=held.get("jobName"), job_definition=held.get("jobDefinition"),
                           manifest=held.get("manifest"))
        return Outcome(obj, FAILED, error="another submission holds this object in progress; retry later")

    def reopen(self, obj: ObjectRef, failed_job_id: str | None = None) -> dict | None:
        """Make ``obj`` claimable again after its job failed for good (``submit --failed-only``):
        delete its COMPLETED record when that names ``failed_job_id`` (the error marker's job; any
        job when ``None``). Returns the stored record (``jobId``, ...) when it names another job,
        a later submission that has not run yet (the record stays), else ``None``. An in-progress
        record is left alone: its holder is submitting the object now and the claim says so."""
        from aws_lambda_powertools.utilities.idempotency.exceptions import IdempotencyItemNotFoundError

        data = dataclasses.asdict(obj)
        try:
            record = self.persistence.get_record(data=data)
        except IdempotencyItemNotFoundError:
            return None
        if record is None or record.status != "COMPLETED":
            return None
        stored = record.response_json_as_dict() or {}
        if failed_job_id and stored.get("jobId") and stored["jobId"] != failed_job_id:
            return stored
        self.persistence.delete_record(data=data, exception=RuntimeError("resubmitted after a failure"))
        return None

    def complete(self, obj: ObjectRef, response: dict) -> None:
        self.persistence.save_success(data=dataclasses.asdict(obj), result=response)

    def release(self, obj: ObjectRef, exc: Exception) -> None:
        self.persistence.delete_record(data=dataclasses.asdict(obj), exception=exc)

    # -- submission --------------------------------------------------------------------------------
    def submit_packs(self, objects: Sequence[ObjectRef]) -> list[Outcome]:
        """Claim, pack and submit objects that passed the rules; one :class:`Outcome` per object,
        in order. Never raises for a failed pack: its objects come back ``failed`` (claims
        released) and the other packs go on. A later object with the bucket/key/ETag of an
        earlier one is a ``duplicate`` of it (``failed`` with it if its pack failed)."""
        outcomes: list[Outcome | None] = [None] * len(objects)
        first: dict[tuple[str, str, str], int] = {}
        claimed: list[ObjectRef] = []
        for i, obj in enumerate(objects):
            if _identity(obj) in first:
                continue
            first[_identity(obj)] = i
            outcomes[i] = self.try_claim(obj)
            if outcomes[i] is None:
                claimed.append(obj)
        for pack in make_packs(claimed, self.settings):
            for obj, outcome in zip(pack.objects, self.submit_pack(pack)):
                outcomes[first[_identity(obj)]] = outcome
        result: list[Outcome] = []
        for obj, outcome in zip(objects, outcomes):
            result.append(outcome or _same_as(result[first[_identity(obj)]], obj))
        return result

    def submit_pack(self, pack: Pack) -> list[Outcome]:
        """One job for a pack whose objects this submitter has claimed: today's single-object
        request for a pack of one, else a manifest and a pack job. Outcomes in pack order."""
        manifest = None
        if len(pack) > 1:
            manifest = build_manifest([pack.objects], output_prefix=self.settings.output_prefix,
                                      job_definition=pack.job_definition)
            request = manifest_job_request(manifest, self.settings, source=self.source)
        else:
            request = submit_job_request(pack.objects[0], self.settings, source=self.source)
        try:
            job = self._submit(request, manifest)
        except Exception as exc:  # noqa: BLE001 - this pack fails, the others go on
            return self._failed(pack.objects, exc)
        record = {**job, "manifest": manifest.uri if manifest else None}
        return [self._completed(obj, record) for obj in pack.objects]

    def submit_array(self, packs: Sequence[Pack]) -> list[Outcome]:
        """One array job whose element ``i`` is ``packs[i]`` (at least 2, at most 10,000 packs of
        one bucket and one job definition, all claimed by this submitter). Outcomes of every
        object, pack after pack; each element's job id is ``<array job id>:<i>``."""
        manifest = build_manifest([pack.objects for pack in packs], output_prefix=self.settings.output_prefix,
                                  job_definition=packs[0].job_definition)
        request = manifest_job_request(manifest, self.settings, name_prefix=self.source,
                                       array_size=len(packs), source=self.source)
        objects = [obj for pack in packs for obj in pack.objects]
        try:
            job = self._submit(request, manifest)
        except Exception as exc:  # noqa: BLE001 - this array fails, the others go on
            return self._failed(objects, exc)
        return [
            self._completed(obj, {**job, "jobId": f"{job['jobId']}:{index}", "arrayJobId": job["jobId"],
                                  "manifest": manifest.uri})
            for index, pack in enumerate(packs) for obj in pack.objects
        ]

    def _submit(self, request: dict, manifest: Manifest | None) -> dict:
        """PUT the manifest (if any), then SubmitJob; the job's idempotency record."""
        if manifest is not None:
            manifest.put(self.clients.s3)
        response = self.clients.batch.submit_job(**request)
        return {"jobId": response["jobId"], "jobName": response.get("jobName", request["jobName"]),
                "jobDefinition": request["jobDefinition"]}

    def _failed(self, objects: Sequence[ObjectRef], exc: Exception) -> list[Outcome]:
        """Every object of a job that could not be submitted: claim released, ``failed``."""
        for obj in objects:
            self._release_quietly(obj, exc)
        return [Outcome(obj, FAILED, error=describe_error(exc)) for obj in objects]

    def _completed(self, obj: ObjectRef, record: dict) -> Outcome:
        """Complete ``obj``'s record with its job. The job exists either way: a failed write only
        means the claim expires instead, and a redelivery after that submits a job the worker's
        completion marker turns into a no-op."""
        try:
            self.complete(obj, record)
        except Exception:  # noqa: BLE001
            _log.warning("job submitted but its idempotency record was not completed",
                         extra={"bucket": obj.bucket, "key": obj.key, "job_id": record["jobId"]}, exc_info=True)
        return Outcome(obj, SUBMITTED, job_id=record["jobId"], job_name=record["jobName"],
                       job_definition=record["jobDefinition"], manifest=record.get("manifest"))

    def _release_quietly(self, obj: ObjectRef, exc: Exception) -> None:
        """Delete a claim after a failed submit; if that fails too, the claim expires with the
        invocation and the retry (after the queue's visibility timeout, longer) proceeds."""
        try:
            self.release(obj, exc)
        except Exception:  # noqa: BLE001
            _log.warning("could not release the claim of an object whose submit failed",
                         extra={"bucket": obj.bucket, "key": obj.key}, exc_info=True)


def _identity(obj: ObjectRef) -> tuple[str, str, str]:
    """What makes two deliveries the same object content (the idempotency key's fields)."""
    return obj.bucket, obj.key, obj.etag


def _same_as(first: Outcome, obj: ObjectRef) -> Outcome:
    """The outcome of a repeat of an object within one call: a duplicate of the first
    occurrence's job, or failed with it (so that its delivery is retried as well)."""
    if first.status == FAILED:
        return dataclasses.replace(first, obj=obj)
    return dataclasses.replace(first, obj=obj, status=DUPLICATE, reason=rules.DUPLICATE, error=None)
