"""The submitter Lambda: S3 "object created" notifications -> one AWS Batch job per object content.

Handler: ``submitter.app.handler``. It accepts the three ways the stack (or anyone) can wire it:

* **SQS** (the deployed path): an SQS batch whose message bodies are S3 notifications (or
  EventBridge "Object Created" events, or ``s3:TestEvent``). Processed with powertools'
  ``BatchProcessor``; the response is ``{"batchItemFailures": [...]}`` so only failed messages
  return to the queue (event source mapping with ``ReportBatchItemFailures``, redrive to a DLQ).
* **S3 notification** invoked directly (asynchronous invoke) and
* **EventBridge "Object Created"** (asynchronous invoke): every object is attempted; if any
  failed the handler raises, so Lambda's async retries and the DLQ / on-failure destination
  take over. Idempotency makes re-processing the objects that did succeed harmless.

``s3:TestEvent`` messages are acknowledged and ignored. See docs/submitter.md.

Cold start
    :class:`~submitter.settings.SubmitterSettings` is read from the environment when this module
    is imported; a bad configuration fails the init with one error listing every problem.

Seam for local mode and tests
    Nothing here talks to AWS until the first object is processed. Before that (or between
    invocations) inject what to talk to::

        from submitter import app
        from submitter.jobs import Clients
        app.set_clients(Clients.create(batch=my_batch_stand_in))  # s3/dynamodb: boto3 clients,
                                                                 # AWS_ENDPOINT_URL is honoured
        app.handler(event, context)

    ``batch`` only needs ``submit_job(**kwargs) -> {"jobId": ..., "jobName": ...}``.
    :func:`configure` also replaces the settings (``configure(settings=..., clients=...)``);
    :func:`get_clients` / :func:`get_submitter` return what the handler uses.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote_plus

from aws_lambda_powertools import Logger, Metrics, Tracer
from aws_lambda_powertools.metrics import EphemeralMetrics, MetricUnit
from aws_lambda_powertools.utilities.batch import BatchProcessor, EventType, process_partial_response
from aws_lambda_powertools.utilities.data_classes import EventBridgeEvent, S3Event, SQSEvent
from aws_lambda_powertools.utilities.data_classes.sqs_event import SQSRecord

from submitter import rules
from submitter.jobs import Clients, ObjectRef, Outcome, Submitter, normalize_etag
from submitter.settings import SettingsError, SubmitterSettings

SERVICE = os.environ.get("POWERTOOLS_SERVICE_NAME") or "whisper-batch"
NAMESPACE = os.environ.get("POWERTOOLS_METRICS_NAMESPACE") or "WhisperBatch"

logger = Logger(service=SERVICE)
tracer = Tracer(service=SERVICE)
# service="" stops powertools adding its lower-case "service" dimension: the contract
# (docs/architecture.md) is the dimension ``Service=<service>``, set as a default dimension.
metrics = Metrics(namespace=NAMESPACE, service="")
metrics.set_default_dimensions(Service=SERVICE)
processor = BatchProcessor(event_type=EventType.SQS, raise_on_entire_batch_failure=False)

# ---- cold start: validate the configuration once --------------------------------------------
try:
    SETTINGS: SubmitterSettings = SubmitterSettings.from_env()
except SettingsError as _exc:
    logger.error("submitter configuration is invalid", extra={"problems": _exc.problems})
    raise

_clients: Clients | None = None
_submitter: Submitter | None = None


def configure(settings: SubmitterSettings | None = None, clients: Clients | None = None) -> None:
    """Replace the settings and/or clients (tests, local mode); the next call rebuilds the
    submitter. ``clients=None`` keeps the current ones."""
    global SETTINGS, _clients, _submitter
    if settings is not None:
        SETTINGS = settings
    if clients is not None:
        _clients = clients
    _submitter = None


def set_clients(clients: Clients | None) -> None:
    """Use these clients from now on (``None``: back to lazily created boto3 clients)."""
    global _clients, _submitter
    _clients = clients
    _submitter = None


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


@dataclass
class _Tally:
    submitted: int = 0
    duplicates: int = 0
    failed: int = 0
    skipped: Counter = field(default_factory=Counter)

    def summary(self) -> dict:
        skipped = sum(n for reason, n in self.skipped.items() if reason != rules.DUPLICATE)
        return {"submitted": self.submitted, "duplicates": self.duplicates, "skipped": skipped,
                "failed": self.failed}


# ---- event shapes -------------------------------------------------------------------------------

def _objects_from_s3_notification(payload: dict, tally: _Tally) -> Iterator[ObjectRef]:
    """S3 notification (direct or the body of an SQS message). Keys are URL-encoded."""
    for record in S3Event(payload).records:
        s3 = record.s3
        raw_key = s3.get_object.key
        if not record.event_name.startswith("ObjectCreated:"):
            _skip(tally, rules.NOT_OBJECT_CREATED, bucket=s3.bucket.name, key=unquote_plus(raw_key),
                  event_name=record.event_name)
            continue
        size = s3.get_object.get("size")
        yield ObjectRef(
            bucket=s3.bucket.name,
            key=unquote_plus(raw_key),  # '+' = space, %2B = '+', %XX = UTF-8 bytes
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
        _skip(tally, rules.NOT_OBJECT_CREATED, bucket=bucket, key=obj.get("key"), event_name=event.detail_type)
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


# ---- processing ---------------------------------------------------------------------------------

def _skip(tally: _Tally, reason: str, **fields: Any) -> None:
    tally.skipped[reason] += 1
    logger.info("object skipped", extra={"reason": reason, **fields})


@tracer.capture_method(capture_response=False)
def _process_object(obj: ObjectRef, tally: _Tally) -> Outcome:
    try:
        outcome = get_submitter().process(obj)
    except Exception:
        tally.failed += 1
        logger.exception("submit failed; the object will be retried",
                         extra={"bucket": obj.bucket, "key": obj.key, "etag": obj.etag})
        raise
    fields = {"bucket": obj.bucket, "key": obj.key, "etag": outcome.obj.etag, "size": outcome.obj.size}
    if outcome.status == "skipped":
        _skip(tally, outcome.reason or "unknown", **fields)
    elif outcome.status == "duplicate":
        tally.duplicates += 1
        _skip(tally, rules.DUPLICATE, job_id=outcome.job_id, job_name=outcome.job_name, **fields)
    else:
        tally.submitted += 1
        logger.info("job submitted", extra={"job_id": outcome.job_id, "job_name": outcome.job_name,
                                            "job_definition": outcome.job_definition, **fields})
    return outcome


def _process_payload(payload: dict, tally: _Tally) -> None:
    """Every object of one notification; re-raises (after trying the others) if any failed."""
    first_error: Exception | None = None
    for obj in _objects(payload, tally):
        try:
            _process_object(obj, tally)
        except Exception as exc:  # noqa: BLE001 - reported by the caller
            first_error = first_error or exc
    if first_error is not None:
        raise first_error


def _correlation_id(payload: dict) -> str | None:
    if isinstance(payload.get("Records"), list) and payload["Records"]:
        return (payload["Records"][0].get("responseElements") or {}).get("x-amz-request-id")
    if _is_eventbridge(payload):
        return (payload.get("detail") or {}).get("request-id") or payload.get("id")
    return payload.get("RequestId")


def _emit_metrics(tally: _Tally) -> None:
    """One EMF document per invocation for JobsSubmitted/SubmitFailures (dimension Service) and
    one per skip reason for ObjectsSkipped (dimensions Service, Reason): powertools applies
    dimensions to a whole flush, so each Reason gets its own EphemeralMetrics flush."""
    if tally.submitted:
        metrics.add_metric(name="JobsSubmitted", unit=MetricUnit.Count, value=tally.submitted)
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
    submitter = get_submitter()
    submitter.register_lambda_context(context)
    tally = _Tally()
    try:
        if _is_sqs(event):
            return _handle_sqs(event, context, tally)
        logger.set_correlation_id(_correlation_id(event))
        _process_payload(event, tally)  # raises (after trying every object) if any failed
        logger.info("invocation done", extra=tally.summary())
        return tally.summary()
    except Exception as exc:
        if not _is_sqs(event):
            logger.error("invocation failed; Lambda retries it (then DLQ/on-failure destination)",
                         extra={**tally.summary(), "error": repr(exc)})
        raise
    finally:
        _emit_metrics(tally)


def _handle_sqs(event: dict, context: Any, tally: _Tally) -> dict:
    def record_handler(record: SQSRecord) -> None:
        logger.set_correlation_id(record.message_id)
        try:
            payload = json.loads(record.body)
            if not isinstance(payload, dict):
                raise ValueError("not a JSON object")
        except ValueError as exc:
            logger.error("SQS message is not an S3/EventBridge notification; it will go to the DLQ",
                         extra={"body": record.body[:500]})
            raise UnrecognizedEventError(f"SQS body is not a JSON object: {record.body[:200]!r}") from exc
        try:
            _process_payload(payload, tally)
        except UnrecognizedEventError:
            logger.error("SQS message is not an S3/EventBridge notification; it will go to the DLQ",
                         extra={"body": record.body[:500]})
            raise

    response = process_partial_response(event=event, record_handler=record_handler,
                                        processor=processor, context=context)
    logger.set_correlation_id(None)
    logger.info("batch done", extra={**tally.summary(), "records": len(event["Records"]),
                                     "batch_item_failures": len(response.get("batchItemFailures", []))})
    return response


__all__ = ["handler", "configure", "set_clients", "get_clients", "get_submitter", "Clients", "SETTINGS"]
