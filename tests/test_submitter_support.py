"""Shared fixtures and event builders for the submitter tests (moto: S3, SQS, Batch, DynamoDB).

Event shapes follow the AWS documentation:
* S3 notification: https://docs.aws.amazon.com/AmazonS3/latest/userguide/notification-content-structure.html
* SQS -> Lambda: https://docs.aws.amazon.com/lambda/latest/dg/with-sqs.html
* EventBridge "Object Created": https://docs.aws.amazon.com/AmazonS3/latest/userguide/ev-events.html
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from urllib.parse import quote_plus

import pytest

REGION = "us-east-1"
ACCOUNT = "123456789012"
BUCKET = "audio-bucket"
TABLE = "whisper-batch-idempotency"
QUEUE = "whisper-batch-jobs"
JOB_DEF = "whisper-batch-job"
JOB_DEF_LONG = "whisper-batch-job-long"

ENV = {
    "JOB_QUEUE": QUEUE,
    "JOB_DEFINITION": JOB_DEF,
    "JOB_DEFINITION_LONG": JOB_DEF_LONG,
    "LONG_JOB_MIN_BYTES": str(50 * 1024 * 1024),
    "MAX_OBJECT_BYTES": str(2 * 1024**3),
    "INPUT_PREFIX": "uploads/",
    "OUTPUT_PREFIX": "transcripts/",
    "IDEMPOTENCY_TABLE": TABLE,
}
POWERTOOLS_ENV = {
    "POWERTOOLS_SERVICE_NAME": "whisper-batch",
    "POWERTOOLS_METRICS_NAMESPACE": "WhisperBatch",
    "POWERTOOLS_TRACE_DISABLED": "1",
    "LOG_LEVEL": "INFO",
    "AWS_DEFAULT_REGION": REGION,
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
}


@dataclass
class LambdaContext:
    function_name: str = "whisper-batch-submitter"
    memory_limit_in_mb: int = 256
    invoked_function_arn: str = f"arn:aws:lambda:{REGION}:{ACCOUNT}:function:whisper-batch-submitter"
    aws_request_id: str = "c6af9ac6-7b61-11e6-9a41-93e8deadbeef"
    remaining_ms: int = 60_000

    def get_remaining_time_in_millis(self) -> int:
        return self.remaining_ms


# ---- AWS resources in moto ------------------------------------------------------------------

def create_table(dynamodb) -> None:
    dynamodb.create_table(
        TableName=TABLE,
        KeySchema=[{"AttributeName": "id", "KeyType": "HASH"}],
        AttributeDefinitions=[{"AttributeName": "id", "AttributeType": "S"}],
        BillingMode="PAY_PER_REQUEST",
    )


def create_batch(session) -> None:
    """Unmanaged compute environment + queue + the two job definitions (moto's docker-free Batch)."""
    iam = session.client("iam")
    role = iam.create_role(RoleName="batch-service", AssumeRolePolicyDocument="{}")["Role"]["Arn"]
    batch = session.client("batch")
    env = batch.create_compute_environment(computeEnvironmentName="inf2", type="UNMANAGED",
                                           state="ENABLED", serviceRole=role)
    batch.create_job_queue(jobQueueName=QUEUE, state="ENABLED", priority=1,
                           computeEnvironmentOrder=[{"order": 1, "computeEnvironment": env["computeEnvironmentArn"]}])
    for name, timeout in ((JOB_DEF, 3600), (JOB_DEF_LONG, 6 * 3600)):
        batch.register_job_definition(
            jobDefinitionName=name, type="container",
            parameters={"input": "", "output": ""},
            containerProperties={
                "image": "whisper-batch:latest",
                "command": ["run-job", "--input", "Ref::input", "--output", "Ref::output"],
                "resourceRequirements": [{"type": "VCPU", "value": "1"}, {"type": "MEMORY", "value": "4096"}],
            },
            timeout={"attemptDurationSeconds": timeout},
        )


@pytest.fixture
def aws(monkeypatch):
    """moto for everything, with Batch in its docker-free mode; yields a boto3 Session."""
    import boto3
    from moto import mock_aws

    for k, v in {**POWERTOOLS_ENV, **ENV}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    with mock_aws(config={"batch": {"use_docker": False}}):
        session = boto3.session.Session(region_name=REGION)
        session.client("s3").create_bucket(Bucket=BUCKET)
        create_table(session.client("dynamodb"))
        create_batch(session)
        yield session


class RecordingBatch:
    """Batch stand-in: records SubmitJob calls; ``fail_next`` makes the next N calls raise, and
    ``fail_keys`` every call whose objects include a key ending so. With an ``s3`` client, a
    pack job's objects are read from its manifest (else a manifest input counts as one object)."""

    def __init__(self, s3=None) -> None:
        self.s3 = s3
        self.calls: list[dict] = []
        self.fail_keys: set[str] = set()
        self.fail_next = 0

    def objects_of(self, request: dict) -> list[str]:
        """The object URIs a SubmitJob request covers."""
        uri = request.get("parameters", {}).get("input", "")
        if self.s3 is None or "/_manifests/" not in uri:
            return [uri]
        return [line["input"] for line in read_manifest(self.s3, uri)]

    def submit_job(self, **kwargs) -> dict:
        objects = self.objects_of(kwargs)
        if self.fail_next > 0 or any(uri.endswith(k) for uri in objects for k in self.fail_keys):
            self.fail_next = max(0, self.fail_next - 1)
            from botocore.exceptions import ClientError

            raise ClientError({"Error": {"Code": "TooManyRequestsException", "Message": "Too Many Requests"}},
                              "SubmitJob")
        self.calls.append(kwargs)
        return {"jobId": str(uuid.uuid4()), "jobName": kwargs["jobName"], "jobArn": "arn:x"}

    @property
    def inputs(self) -> list[str]:
        """The ``input`` parameter of every accepted call (an object, or a pack's manifest)."""
        return [c["parameters"]["input"] for c in self.calls]

    @property
    def objects(self) -> list[str]:
        """Every object URI of every accepted call, in submission order."""
        return [uri for call in self.calls for uri in self.objects_of(call)]


def read_manifest(s3, uri: str) -> list[dict]:
    """The JSON lines of a pack manifest ``s3://BUCKET/KEY``."""
    bucket, key = uri.removeprefix("s3://").split("/", 1)
    body = s3.get_object(Bucket=bucket, Key=key)["Body"].read().decode("utf-8")
    return [json.loads(line) for line in body.splitlines()]


@pytest.fixture
def app(aws):
    """``submitter.app`` wired to moto (S3, DynamoDB, Batch)."""
    import submitter.app as app_module
    from submitter.jobs import Clients
    from submitter.settings import SubmitterSettings

    app_module.configure(settings=SubmitterSettings.from_env(), clients=Clients.create(session=aws))
    yield app_module
    app_module.set_clients(None)
    app_module.set_on_outcome(None)


@pytest.fixture
def pack_settings(app):
    """``pack_settings(pack_max_objects=1, ...)``: the handler's settings with these changes."""

    def apply(**changes) -> None:
        app.configure(settings=app.SETTINGS.replace(**changes))

    return apply


@pytest.fixture
def outcomes(app):
    """Every :class:`~submitter.jobs.Outcome` the handler reports (its ``on_outcome`` callback)."""
    seen: list = []
    app.set_on_outcome(seen.append)
    return seen


@pytest.fixture
def recording(app, aws):
    """Like ``app`` but Batch is a :class:`RecordingBatch` (the local-mode seam)."""
    from submitter.jobs import Clients

    stub = RecordingBatch(s3=aws.client("s3"))
    app.set_clients(Clients.create(batch=stub, session=aws))
    return stub


@pytest.fixture
def logs(app):
    """Structured log lines of the handler's Logger (its handler keeps the stdout of import time)."""
    import io

    handler = app.logger.registered_handler
    buffer = io.StringIO()
    old = handler.setStream(buffer)

    def read() -> list[dict]:
        return [json.loads(line) for line in buffer.getvalue().splitlines() if line.startswith("{")]

    yield read
    handler.setStream(old)


def put(session, key: str, body: bytes = b"RIFF....WAVEfmt audio", bucket: str = BUCKET) -> dict:
    """Upload and return ``{"size", "etag"}`` as a notification would carry them."""
    s3 = session.client("s3")
    resp = s3.put_object(Bucket=bucket, Key=key, Body=body)
    return {"size": len(body), "etag": resp["ETag"].strip('"')}


# ---- event builders (documented shapes) ---------------------------------------------------------

def s3_record(key: str, size: int = 1024, etag: str = "0123456789abcdef0123456789abcdef",
              bucket: str = BUCKET, event_name: str = "ObjectCreated:Put", encode: bool = True) -> dict:
    """One record of an S3 notification; the key is URL-encoded as S3 does it."""
    obj = {"key": quote_plus(key, safe="/") if encode else key, "size": size, "eTag": etag,
           "sequencer": "0055AED6DCD90281E5"}
    if event_name.startswith("ObjectRemoved"):
        obj = {"key": obj["key"], "sequencer": obj["sequencer"]}
    return {
        "eventVersion": "2.1",
        "eventSource": "aws:s3",
        "awsRegion": REGION,
        "eventTime": "2026-11-22T12:00:00.000Z",
        "eventName": event_name,
        "userIdentity": {"principalId": "AWS:AIDAJDPLRKLG7UEXAMPLE"},
        "requestParameters": {"sourceIPAddress": "127.0.0.1"},
        "responseElements": {"x-amz-request-id": "C3D13FE58DE4C810",
                             "x-amz-id-2": "FMyUVURIY8/IgAtTv8xRjskZQpcIZ9KG4V5Wp6S7S/JRWeUWerMUE5JgHvANOjpD"},
        "s3": {
            "s3SchemaVersion": "1.0",
            "configurationId": "whisper-batch-uploads",
            "bucket": {"name": bucket, "ownerIdentity": {"principalId": "A3NL1KOZZKExample"},
                       "arn": f"arn:aws:s3:::{bucket}"},
            "object": obj,
        },
    }


def s3_notification(*records: dict) -> dict:
    return {"Records": list(records)}


def s3_test_event(bucket: str = BUCKET) -> dict:
    return {"Service": "Amazon S3", "Event": "s3:TestEvent", "Time": "2026-11-22T12:00:00.000Z",
            "Bucket": bucket, "RequestId": "5582815E1AEA5ADF", "HostId": "8cLeGAmw098X5cv4Zkwcmo8vvZa3eH3eKxsPzbB9wrR+YstdA6Knx4Ip8EXAMPLE"}


def sqs_event(*bodies: dict | str) -> dict:
    records = []
    for i, body in enumerate(bodies):
        records.append({
            "messageId": f"059f36b4-87a3-44ab-83d2-661975830a{i:02d}",
            "receiptHandle": f"AQEBwJnKyrHigUMZj6rYigCgxlaS3SLy0a{i}...",
            "body": body if isinstance(body, str) else json.dumps(body),
            "attributes": {"ApproximateReceiveCount": "1", "SentTimestamp": "1545082649183",
                           "SenderId": "AIDAIENQZJOLO23YVJ4VO", "ApproximateFirstReceiveTimestamp": "1545082649185"},
            "messageAttributes": {},
            "md5OfBody": "e4e68fb7bd0e697a0ae8f1bb342846b3",
            "eventSource": "aws:sqs",
            "eventSourceARN": f"arn:aws:sqs:{REGION}:{ACCOUNT}:whisper-batch-uploads",
            "awsRegion": REGION,
        })
    return {"Records": records}


def eventbridge_event(key: str, size: int | None = 1024, etag: str | None = "0123456789abcdef0123456789abcdef",
                      bucket: str = BUCKET, detail_type: str = "Object Created",
                      version_id: str | None = None) -> dict:
    """EventBridge S3 event; the key is NOT URL-encoded (version-id only on versioned buckets)."""
    obj: dict = {"key": key, "sequencer": "617f08299329d189"}
    if version_id is not None:
        obj["version-id"] = version_id
    if size is not None:
        obj["size"] = size
    if etag is not None:
        obj["etag"] = etag
    return {
        "version": "0",
        "id": "17793124-05d4-b198-2fde-7ededc63b103",
        "detail-type": detail_type,
        "source": "aws.s3",
        "account": ACCOUNT,
        "time": "2026-11-22T12:00:00Z",
        "region": REGION,
        "resources": [f"arn:aws:s3:::{bucket}"],
        "detail": {
            "version": "0",
            "bucket": {"name": bucket},
            "object": obj,
            "request-id": "N4N7GDK58NMKJ12R",
            "requester": ACCOUNT,
            "source-ip-address": "1.2.3.4",
            "reason": "PutObject",
        },
    }
