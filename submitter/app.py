"""The submitter Lambda: S3 "object created" notifications -> Batch jobs over packs of objects.

Handler: ``submitter.app.handler``. It accepts the three ways the stack (or anyone) can wire it:

* **SQS** (the deployed path): an SQS batch whose message bodies are S3 notifications (or
  EventBridge "Object Created" events, or ``s3:TestEvent``). The response is
  ``{"batchItemFailures": [...]}`` so only failed messages return to the queue (event source
  mapping with ``ReportBatchItemFailures``, redrive to a DLQ).
* **S3 notification** invoked directly (asynchronous invoke) and
* **EventBridge "Object Created"** (asynchronous invoke): every object is attempted; if any
  failed the handler raises, so Lambda's async retries and the DLQ / on-failure destination
  take over. Idempotency makes re-processing the objects that did succeed harmless.

Every invocation runs in three phases, so that all its objects can share jobs (issue #11):

1. **collect**: each record (SQS message, or the direct event) becomes objects; the skip rules
   apply (HeadObject only when the event lacks size/ETag). A record that cannot be read fails
   on its own.
2. **submit**: all the invocation's objects are packed together and submitted
   (:meth:`submitter.jobs.Submitter.submit_packs`): one ``SubmitJob`` per pack.
3. **report**: each object's :class:`~submitter.jobs.Outcome` is logged, counted and handed to
   the ``on_outcome`` callback; a record with any failed object is a batch item failure.

``s3:TestEvent`` messages are acknowledged and ignored. See docs/submitter.md.

Cold start
    :class:`~submitter.settings.SubmitterSettings` is read from the environment when this module
    is imported; a bad configuration fails the init with one error listing every problem.

Seam for local mode and tests
    Nothing here talks to AWS until the first object is processed. Before that (or between
    invocations) inject what to talk to and who hears the outcomes::

        from submitter import app
        from submitter.jobs import Clients
        app.configure(clients=Clients.create(batch=my_batch_stand_in),  # s3/dynamodb: boto3,
                      on_outcome=print)                                 # AWS_ENDPOINT_URL honoured
        app.handler(event, context)

    ``batch`` only needs ``submit_job(**kwargs) -> {"jobId": ..., "jobName": ...}``.
    :func:`configure` also replaces the settings; :func:`set_clients` / :func:`set_on_outcome`
    replace one thing; :func:`get_clients` / :func:`get_submitter` return what the handler uses.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote_plus

from aws_lambda_powertools import Logger, Metrics, Tracer
from aws_lambda_powertools.metrics import EphemeralMetrics, MetricUnit
from aws_lambda_powertools.utilities.data_classes import EventBridgeEvent, S3Event, SQSEvent
from aws_lambda_powertools.utilities.data_classes.sqs_event import SQSRecord

from submitter import rules
from submitter.jobs import (
    DUPLICATE,
    FAILED,
    SKIPPED,
    SUBMITTED,
    Clients,
    Outcome,
    Submitter,
    describe_error,
)
from submitter.objects import ObjectRef, normalize_etag
from submitter.settings import SettingsError, SubmitterSettings

SERVICE = os.environ.get("POWERTOOLS_SERVICE_NAME") or "whisper-batch"
NAMESPACE = os.environ.get("POWERTOOLS_METRICS_NAMESPACE") or "WhisperBatch"

logger = Logger(service=SERVICE)
tracer = Tracer(service=SERVICE)
# service="" stops powertools adding its lower-case "service" dimension: the contract
# (docs/architecture.md) is the dimension ``Service=<service>``, set as a default dimension.
metrics = Metrics(namespace=NAMESPACE, service="")
metrics.set_default_dimensions(Service=SERVICE)

# ---- cold start: validate the configuration once --------------------------------------------
try:
    SETTINGS: SubmitterSettings = SubmitterSettings.from_env()
except SettingsError as _exc:
    logger.error("submitter configuration is invalid", extra={"problems": _exc.problems})
    raise

OutcomeCallback = Callable[[Outcome], Any]

_clients: Clients | None = None
_submitter: Submitter | None = None
_on_outcome: OutcomeCallback | None = None


def configure(settings: SubmitterSettings | None = None, clients: Clients | None = None,
              on_outcome: OutcomeCallback | None = None) -> None:
    """Replace the settings, clients and/or outcome callback (tests, local mode); ``None`` keeps
    the current one. The next call rebuilds the submitter."""
    global SETTINGS, _clients, _submitter, _on_outcome
    if settings is not None:
        SETTINGS = settings
    if clients is not None:
        _clients = clients
    if on_outcome is not None:
        _on_outcome = on_outcome
    _submitter = None


def set_clients(clients: Clients | None) -> None:
    """Use these clients from now on (``None``: back to lazily created boto3 clients)."""
    global _clients, _submitter
    _clients = clients
    _submitter = None


def set_on_outcome(callback: OutcomeCallback | None) -> None:
    """Call ``callback(outcome)`` for every object of every invocation from now on (skipped,
    duplicate, submitted, failed); ``None`` stops it. What it raises is logged and ignored."""
    global _on_outcome
    _on_outcome = callback


def get_clients() -> Clients:
    global _clients
    if _clients is None:
        _clients = Clients.create()
    return _clients


def get_submitter() -> Submitter:
    global _submitter
    if _submitter is None:
        _submitter = Submitter(SETTINGS, get_clients(), source="lambda")
    return _submitter


class UnrecognizedEventError(ValueError):
    """The payload is none of the documented shapes (it goes to the DLQ, visibly)."""


class SubmitError(RuntimeError):
    """A direct invocation had objects that were not submitted (Lambda retries the event)."""


@dataclass
class _Delivery:
    """What fails or succeeds as one: an SQS record (``item_id`` = its message id), or the whole
    event of a direct invocation (``item_id`` None). ``objects`` passed the rules."""

    item_id: str | None
    objects: list[ObjectRef] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        return bool(self.errors)


@dataclass
class _Tally:
    """Counts of one invocation (log summary and metrics)."""

    submitted: int = 0
    duplicates: int = 0
    failed: int = 0
    job_ids: set[str] = field(default_factory=set)
    skipped: Counter = field(default_factory=Counter)

    def summary(self) -> dict:
        skipped = sum(n for reason, n in self.skipped.items() if reason != rules.DUPLICATE)
        return {"submitted": self.submitted, "jobs": len(self.job_ids), "duplicates": self.duplicates,
                "skipped": skipped, "failed": self.failed}


# ---- event shapes -------------------------------------------------------------------------------

def _objects_from_s3_notification(payload: dict, tally: _Tally) -> Iterator[ObjectRef]:
    """S3 notification (direct or the body of an SQS message). Keys are URL-encoded."""
    for record in S3Event(payload).records:
        s3 = record.s3
        key = unquote_plus(s3.get_object.key)  # '+' = space, %2B = '+', %XX = UTF-8 bytes
        if not record.event_name.startswith("ObjectCreated:"):
            _report(Outcome(ObjectRef(s3.bucket.name, key), SKIPPED, reason=rules.NOT_OBJECT_CREATED),
                    tally, event_name=record.event_name)
            continue
        size = s3.get_object.get("size")
        yield ObjectRef(
            bucket=s3.bucket.name,
            key=key,
            etag=normalize_etag(s3.get_object.etag),
            size=int(size) if size is not None else None,
            version_id=s3.get_object.version_id,
        )


def _objects_from_eventbridge(payload: dict, tally: _Tally) -> Iterator[ObjectRef]:
    """EventBridge "Object Created". Keys are NOT URL-encoded here, so the raw ``detail.object.key``
    is used (powertools' ``S3EventBridgeNotificationObject.key`` would unquote it)."""
    event = EventBridgeEvent(payload)
    detail = event.detail
    bucket = detail.get("bucket", {}).get("name", "")
    obj = detail.get("object", {})
    if event.detail_type != "Object Created":
        _report(Outcome(ObjectRef(bucket, str(obj.get("key", ""))), SKIPPED, reason=rules.NOT_OBJECT_CREATED),
                tally, event_name=event.detail_type)
        return
    size = obj.get("size")
    yield ObjectRef(
        bucket=bucket,
        key=obj["key"],
        etag=normalize_etag(obj.get("etag")),
        size=int(size) if size is not None else None,
        version_id=obj.get("version-id"),
    )


def _is_eventbridge(payload: dict) -> bool:
    return "detail-type" in payload and payload.get("source") == "aws.s3"


def _is_test_event(payload: dict) -> bool:
    return payload.get("Event") == "s3:TestEvent"


def _objects(payload: dict, tally: _Tally) -> Iterator[ObjectRef]:
    if _is_test_event(payload):
        logger.info("s3:TestEvent acknowledged", extra={"bucket": payload.get("Bucket")})
        return iter(())
    if isinstance(payload.get("Records"), list):
        return _objects_from_s3_notification(payload, tally)
    if _is_eventbridge(payload):
        return _objects_from_eventbridge(payload, tally)
    raise UnrecognizedEventError(f"not an S3 notification or EventBridge S3 event: keys={sorted(payload)[:10]}")


def _sqs_payload(record: SQSRecord) -> dict:
    try:
        payload = json.loads(record.body)
    except ValueError as exc:
        raise UnrecognizedEventError(f"SQS body is not JSON: {record.body[:200]!r}") from exc
    if not isinstance(payload, dict):
        raise UnrecognizedEventError(f"SQS body is not a JSON object: {record.body[:200]!r}")
    return payload


# ---- reporting -----------------------------------------------------------------------------------

def _report(outcome: Outcome, tally: _Tally, **fields: Any) -> None:
    """Log and count one object's outcome, then hand it to the ``on_outcome`` callback."""
    obj = outcome.obj
    fields = {"bucket": obj.bucket, "key": obj.key, "etag": obj.etag, "size": obj.size, **fields}
    job = {"job_id": outcome.job_id, "job_name": outcome.job_name, "job_definition": outcome.job_definition,
           "manifest": outcome.manifest}
    if outcome.status == SUBMITTED:
        tally.submitted += 1
        tally.job_ids.add(str(outcome.job_id))
        logger.info("job submitted", extra={**job, **fields})
    elif outcome.status == DUPLICATE:
        tally.duplicates += 1
        tally.skipped[rules.DUPLICATE] += 1
        logger.info("object skipped", extra={"reason": rules.DUPLICATE, **job, **fields})
    elif outcome.status == SKIPPED:
        tally.skipped[outcome.reason or "unknown"] += 1
        logger.info("object skipped", extra={"reason": outcome.reason, **fields})
    else:
        tally.failed += 1
        logger.error("submit failed; the object will be retried", extra={"error": outcome.error, **fields})
    if _on_outcome is not None:
        try:
            _on_outcome(outcome)
        except Exception:  # noqa: BLE001 - an observer never fails the submission
            logger.exception("on_outcome callback raised; ignored", extra=fields)


# ---- phases ---------------------------------------------------------------------------------------

@tracer.capture_method(capture_response=False)
def _collect(payload: dict, delivery: _Delivery, tally: _Tally) -> None:
    """Phase 1 for one record: its objects that pass the rules go to ``delivery.objects``.
    Raises :class:`UnrecognizedEventError`; a failed HeadObject fails its object only."""
    submitter = get_submitter()
    for obj in _objects(payload, tally):
        try:
            obj, reason = submitter.check(obj)
        except Exception as exc:  # noqa: BLE001 - this object is retried with its record
            delivery.errors.append(describe_error(exc))
            _report(Outcome(obj, FAILED, error=describe_error(exc)), tally)
            continue
        if reason is not None:
            _report(Outcome(obj, SKIPPED, reason=reason), tally)
        else:
            delivery.objects.append(obj)


@tracer.capture_method(capture_response=False)
def _submit(deliveries: list[_Delivery], tally: _Tally) -> None:
    """Phases 2 and 3: every object of every delivery packed and submitted together, each
    outcome reported under its own delivery's correlation id."""
    objects = [obj for delivery in deliveries for obj in delivery.objects]
    outcomes = iter(get_submitter().submit_packs(objects) if objects else ())
    for delivery in deliveries:
        if delivery.item_id is not None:
            logger.set_correlation_id(delivery.item_id)
        for _ in delivery.objects:
            outcome = next(outcomes)
            if outcome.status == FAILED:
                delivery.errors.append(outcome.error or "failed")
            _report(outcome, tally)


def _collect_record(record: SQSRecord, tally: _Tally) -> _Delivery:
    """Phase 1 for one SQS message; a message that cannot be read fails alone."""
    logger.set_correlation_id(record.message_id)
    delivery = _Delivery(record.message_id)
    try:
        _collect(_sqs_payload(record), delivery, tally)
    except UnrecognizedEventError as exc:
        logger.error("SQS message is not an S3/EventBridge notification; it will go to the DLQ",
                     extra={"body": record.body[:500]})
        delivery.errors.append(str(exc))
    except Exception as exc:  # noqa: BLE001 - a malformed record: retried, then the DLQ
        logger.exception("SQS message could not be processed; it will be retried")
        delivery.errors.append(describe_error(exc))
    return delivery


# ---- the handler ----------------------------------------------------------------------------------

def _correlation_id(payload: dict) -> str | None:
    if isinstance(payload.get("Records"), list) and payload["Records"]:
        return (payload["Records"][0].get("responseElements") or {}).get("x-amz-request-id")
    if _is_eventbridge(payload):
        return (payload.get("detail") or {}).get("request-id") or payload.get("id")
    return payload.get("RequestId")


def _emit_metrics(tally: _Tally) -> None:
    """One EMF document per invocation for JobsSubmitted (jobs = packs), ObjectsSubmitted and
    SubmitFailures (objects; dimension Service) and one per skip reason for ObjectsSkipped
    (dimensions Service, Reason): powertools applies dimensions to a whole flush, so each
    Reason gets its own EphemeralMetrics flush."""
    if tally.submitted:
        metrics.add_metric(name="JobsSubmitted", unit=MetricUnit.Count, value=len(tally.job_ids))
        metrics.add_metric(name="ObjectsSubmitted", unit=MetricUnit.Count, value=tally.submitted)
    if tally.failed:
        metrics.add_metric(name="SubmitFailures", unit=MetricUnit.Count, value=tally.failed)
    if tally.submitted or tally.failed:
        metrics.flush_metrics()
    for reason, count in sorted(tally.skipped.items()):
        skipped = EphemeralMetrics(namespace=NAMESPACE, service="")
        skipped.add_dimension(name="Service", value=SERVICE)
        skipped.add_dimension(name="Reason", value=reason)
        skipped.add_metric(name="ObjectsSkipped", unit=MetricUnit.Count, value=count)
        skipped.flush_metrics()


def _is_sqs(event: Any) -> bool:
    if not isinstance(event, dict) or not event.get("Records") or not isinstance(event["Records"][0], dict):
        return False
    return next(SQSEvent(event).records).event_source == "aws:sqs"


@logger.inject_lambda_context(clear_state=True)
@tracer.capture_lambda_handler(capture_response=False)
def handler(event: dict, context: Any) -> dict:
    get_submitter().register_lambda_context(context)
    tally = _Tally()
    try:
        if _is_sqs(event):
            return _handle_sqs(event, tally)
        return _handle_direct(event, tally)
    finally:
        _emit_metrics(tally)


def _handle_sqs(event: dict, tally: _Tally) -> dict:
    deliveries = [_collect_record(record, tally) for record in SQSEvent(event).records]
    _submit(deliveries, tally)
    logger.set_correlation_id(None)
    failures = [{"itemIdentifier": d.item_id} for d in deliveries if d.failed]
    logger.info("batch done", extra={**tally.summary(), "records": len(deliveries), "batch_item_failures": len(failures)})
    return {"batchItemFailures": failures}


def _handle_direct(event: dict, tally: _Tally) -> dict:
    """A direct S3 / EventBridge invoke: raises (after trying every object) if any failed."""
    logger.set_correlation_id(_correlation_id(event))
    delivery = _Delivery(None)
    try:
        _collect(event, delivery, tally)
        _submit([delivery], tally)
        if delivery.failed:
            raise SubmitError(f"{len(delivery.errors)} object(s) not submitted; first: {delivery.errors[0]}")
    except Exception as exc:
        logger.error("invocation failed; Lambda retries it (then DLQ/on-failure destination)",
                     extra={**tally.summary(), "error": repr(exc)})
        raise
    logger.info("invocation done", extra=tally.summary())
    return tally.summary()


__all__ = ["handler", "configure", "set_clients", "set_on_outcome", "get_clients", "get_submitter", "Clients",
           "Outcome", "SETTINGS", "SubmitError", "UnrecognizedEventError"]
