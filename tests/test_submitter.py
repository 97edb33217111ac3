"""The submitter Lambda handler against moto (S3, SQS, DynamoDB, Batch) and a recording Batch stub."""

from __future__ import annotations

import json
import re

import pytest
from test_submitter_support import (  # noqa: F401 - fixtures
    BUCKET,
    JOB_DEF,
    JOB_DEF_LONG,
    QUEUE,
    TABLE,
    LambdaContext,
    app,
    aws,
    eventbridge_event,
    logs,
    pack_settings,
    put,
    recording,
    s3_notification,
    s3_record,
    s3_test_event,
    sqs_event,
)

JOB_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$")

TRICKY_KEYS = [
    "uploads/my meeting notes.wav",        # space -> '+'
    "uploads/c++ talk+q&a.mp3",            # '+' -> %2B, '&' -> %26
    "uploads/100% done (final).flac",      # '%' -> %25, parentheses
    "uploads/Café Müller/日本語の会議.m4a",  # UTF-8 multi-byte -> %XX%XX
    "uploads/a%2Bb already-encoded-looking.ogg",
]


def emf_docs(capsys) -> list[dict]:
    docs = []
    for line in capsys.readouterr().out.splitlines():
        line = line.strip()
        if line.startswith("{") and '"_aws"' in line:
            docs.append(json.loads(line))
    return docs


def metric_total(docs: list[dict], name: str, **dims: str) -> float:
    total = 0.0
    for doc in docs:
        if name in doc and all(doc.get(k) == v for k, v in dims.items()):
            value = doc[name]
            total += sum(value) if isinstance(value, list) else value
    return total


# ---- event shapes -------------------------------------------------------------------------------

def test_sqs_wrapped_s3_notification_goes_through_moto_batch(app, aws):
    meta = put(aws, "uploads/team/standup 2026-11-22.wav")
    event = sqs_event(s3_notification(s3_record("uploads/team/standup 2026-11-22.wav", **meta)))

    response = app.handler(event, LambdaContext())

    assert response == {"batchItemFailures": []}
    batch = aws.client("batch")
    summaries = batch.list_jobs(jobQueue=QUEUE, filters=[{"name": "JOB_NAME", "values": ["*"]}])["jobSummaryList"]
    assert len(summaries) == 1
    job = batch.describe_jobs(jobs=[summaries[0]["jobId"]])["jobs"][0]
    assert job["parameters"]["input"] == f"s3://{BUCKET}/uploads/team/standup 2026-11-22.wav"
    assert job["parameters"]["output"] == f"s3://{BUCKET}/transcripts/"
    assert JOB_DEF in job["jobDefinition"]
    assert JOB_NAME_RE.match(job["jobName"]) and job["jobName"].startswith("standup_2026-11-22_wav-")


@pytest.mark.parametrize("key", TRICKY_KEYS)
def test_direct_s3_notification_decodes_keys(app, recording, key):
    record = s3_record(key)
    assert "%" in record["s3"]["object"]["key"] or "+" in record["s3"]["object"]["key"]  # really encoded

    result = app.handler(s3_notification(record), LambdaContext())

    assert result["submitted"] == 1
    (call,) = recording.calls
    assert call["parameters"] == {"input": f"s3://{BUCKET}/{key}", "output": f"s3://{BUCKET}/transcripts/"}
    assert JOB_NAME_RE.match(call["jobName"]), call["jobName"]
    assert call["jobQueue"] == QUEUE and call["jobDefinition"] == JOB_DEF
    assert call["propagateTags"] is True


@pytest.mark.parametrize("key", TRICKY_KEYS)
def test_eventbridge_keys_are_taken_verbatim(app, recording, key):
    result = app.handler(eventbridge_event(key), LambdaContext())

    assert result["submitted"] == 1
    assert recording.inputs == [f"s3://{BUCKET}/{key}"]


def test_eventbridge_inside_sqs_and_mixed_batch(app, recording):
    event = sqs_event(
        eventbridge_event("uploads/eb+plus.wav"),
        s3_notification(s3_record("uploads/s3 space.wav")),
        s3_test_event(),
    )
    assert app.handler(event, LambdaContext()) == {"batchItemFailures": []}
    assert len(recording.calls) == 1  # both objects share one pack job
    assert sorted(recording.objects) == [f"s3://{BUCKET}/uploads/eb+plus.wav", f"s3://{BUCKET}/uploads/s3 space.wav"]


def test_missing_size_and_etag_are_read_with_head_object(app, recording, aws):
    meta = put(aws, "uploads/no size.opus", body=b"x" * 1234)
    result = app.handler(eventbridge_event("uploads/no size.opus", size=None, etag=None), LambdaContext())
    assert result["submitted"] == 1
    # the same object announced with its size/etag is the same content -> duplicate
    again = app.handler(eventbridge_event("uploads/no size.opus", size=1234, etag=meta["etag"]), LambdaContext())
    assert again["duplicates"] == 1 and len(recording.calls) == 1


def test_object_deleted_before_head_object_is_skipped(app, recording):
    result = app.handler(eventbridge_event("uploads/gone.wav", size=None, etag=None), LambdaContext())
    assert result["skipped"] == 1 and recording.calls == []


def test_s3_test_event_is_acknowledged_and_ignored(app, recording):
    assert app.handler(sqs_event(s3_test_event()), LambdaContext()) == {"batchItemFailures": []}
    assert app.handler(s3_test_event(), LambdaContext())["submitted"] == 0
    assert recording.calls == []


def test_object_removed_is_ignored(app, recording):
    result = app.handler(s3_notification(s3_record("uploads/a.wav", event_name="ObjectRemoved:Delete")), LambdaContext())
    assert result == {"submitted": 0, "jobs": 0, "duplicates": 0, "skipped": 1, "failed": 0}
    assert recording.calls == []


def test_unrecognized_sqs_body_is_a_batch_item_failure(app, recording):
    event = sqs_event("not json", {"hello": "world"}, s3_notification(s3_record("uploads/ok.wav")))
    response = app.handler(event, LambdaContext())
    failed = [f["itemIdentifier"] for f in response["batchItemFailures"]]
    assert failed == [event["Records"][0]["messageId"], event["Records"][1]["messageId"]]
    assert len(recording.calls) == 1


def test_unrecognized_direct_event_raises(app, recording):
    with pytest.raises(app.UnrecognizedEventError):
        app.handler({"foo": "bar"}, LambdaContext())


# ---- skip rules -------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "key,size,reason",
    [
        ("elsewhere/talk.wav", 10, "outside_input_prefix"),
        ("transcripts/uploads/talk.wav.json", 10, "under_output_prefix"),
        ("transcripts/_manifests/x.jsonl", 10, "under_output_prefix"),
        ("uploads/folder/", 0, "folder_placeholder"),
        ("uploads/notes.txt", 10, "unsupported_extension"),
        ("uploads/no_extension", 10, "unsupported_extension"),
        ("uploads/empty.wav", 0, "empty_object"),
        ("uploads/huge.wav", 2 * 1024**3 + 1, "too_large"),
    ],
)
def test_skip_rules_log_and_count(app, recording, capsys, logs, key, size, reason):
    result = app.handler(s3_notification(s3_record(key, size=size)), LambdaContext())

    assert result["skipped"] == 1 and result["submitted"] == 0
    assert recording.calls == []
    out = capsys.readouterr().out
    assert any(log.get("message") == "object skipped" and log.get("reason") == reason for log in logs())
    emf = [json.loads(line) for line in out.splitlines() if '"_aws"' in line]
    (doc,) = [d for d in emf if "ObjectsSkipped" in d]
    assert doc["Reason"] == reason and doc["Service"] == "whisper-batch" and metric_total([doc], "ObjectsSkipped") == 1
    assert doc["_aws"]["CloudWatchMetrics"][0]["Dimensions"] == [["Service", "Reason"]]
    assert doc["_aws"]["CloudWatchMetrics"][0]["Namespace"] == "WhisperBatch"


def test_extensions_are_case_insensitive(app, recording):
    app.handler(s3_notification(s3_record("uploads/LOUD.WAV"), s3_record("uploads/Clip.Mp4"),
                                s3_record("uploads/x.WebM", etag="e2")), LambdaContext())
    assert len(recording.objects) == 3


def test_big_objects_use_the_long_job_definition(app, recording):
    threshold = app.SETTINGS.long_job_min_bytes
    app.handler(s3_notification(s3_record("uploads/short.wav", size=threshold - 1),
                                s3_record("uploads/hour.wav", size=threshold)), LambdaContext())
    defs = {c["parameters"]["input"].rsplit("/", 1)[-1]: c["jobDefinition"] for c in recording.calls}
    assert defs == {"short.wav": JOB_DEF, "hour.wav": JOB_DEF_LONG}


# ---- exactly once --------------------------------------------------------------------------------------

def test_duplicate_delivery_submits_one_job(app, recording, capsys):
    body = s3_notification(s3_record("uploads/dup.wav", etag="aaaa"))
    first = app.handler(sqs_event(body, body), LambdaContext())  # twice in one batch
    second = app.handler(sqs_event(body), LambdaContext())       # and redelivered later
    direct = app.handler(body, LambdaContext())                  # and wired directly
    eb = app.handler(eventbridge_event("uploads/dup.wav", etag="aaaa"), LambdaContext())

    assert first == second == {"batchItemFailures": []}
    assert direct["duplicates"] == 1 and eb["duplicates"] == 1
    assert len(recording.calls) == 1
    docs = emf_docs(capsys)
    assert metric_total(docs, "JobsSubmitted", Service="whisper-batch") == 1
    assert metric_total(docs, "ObjectsSkipped", Reason="duplicate") == 4


def test_reupload_of_identical_bytes_is_one_job_new_bytes_another(app, recording, aws):
    key = "uploads/reupload.wav"
    a = put(aws, key, b"same bytes")
    b = put(aws, key, b"same bytes")
    assert a == b
    c = put(aws, key, b"different bytes")
    for meta in (a, b, c):
        app.handler(sqs_event(s3_notification(s3_record(key, **meta))), LambdaContext())
    assert len(recording.calls) == 2
    assert recording.calls[0]["jobName"] != recording.calls[1]["jobName"]


def test_submit_failure_is_a_batch_item_failure_and_the_retry_succeeds(app, recording, aws, capsys, pack_settings):
    pack_settings(pack_max_objects=1)  # one job per object: one object's SubmitJob fails alone
    event = sqs_event(*(s3_notification(s3_record(f"uploads/{n}.wav", etag=n)) for n in ("one", "two", "three")))
    recording.fail_keys = {"two.wav"}

    response = app.handler(event, LambdaContext())

    assert response == {"batchItemFailures": [{"itemIdentifier": event["Records"][1]["messageId"]}]}
    assert sorted(recording.inputs) == [f"s3://{BUCKET}/uploads/one.wav", f"s3://{BUCKET}/uploads/three.wav"]
    # no idempotency record is left behind for the failed object
    items = aws.client("dynamodb").scan(TableName=TABLE)["Items"]
    assert len(items) == 2 and all(i["status"]["S"] == "COMPLETED" for i in items)
    docs = emf_docs(capsys)
    assert metric_total(docs, "SubmitFailures") == 1 and metric_total(docs, "JobsSubmitted") == 2

    # SQS redelivers the failed message (and, say, a stray duplicate of a good one)
    recording.fail_keys = set()
    retry = sqs_event(json.loads(event["Records"][1]["body"]), json.loads(event["Records"][0]["body"]))
    assert app.handler(retry, LambdaContext()) == {"batchItemFailures": []}
    assert len(recording.calls) == 3 and recording.inputs[-1] == f"s3://{BUCKET}/uploads/two.wav"


def test_direct_invocation_failure_raises_for_async_retry(app, recording, pack_settings):
    pack_settings(pack_max_objects=1)
    event = s3_notification(s3_record("uploads/good.wav", etag="g"), s3_record("uploads/bad.wav", etag="b"))
    recording.fail_keys = {"bad.wav"}
    with pytest.raises(app.SubmitError, match="1 object.*TooManyRequests"):
        app.handler(event, LambdaContext())
    assert recording.inputs == [f"s3://{BUCKET}/uploads/good.wav"]  # the others were still tried

    recording.fail_keys = set()  # Lambda's async retry: the good one is a duplicate now
    assert app.handler(event, LambdaContext()) == {"submitted": 1, "jobs": 1, "duplicates": 1, "skipped": 0,
                                                   "failed": 0}
    assert len(recording.calls) == 2


def test_eventbridge_failure_raises(app, recording):
    recording.fail_next = 1
    with pytest.raises(app.SubmitError, match="TooManyRequests"):
        app.handler(eventbridge_event("uploads/eb.wav"), LambdaContext())
    assert app.handler(eventbridge_event("uploads/eb.wav"), LambdaContext())["submitted"] == 1


def test_correlation_id_is_the_sqs_message_id(app, recording, logs):
    event = sqs_event(s3_notification(s3_record("uploads/corr.wav")))
    app.handler(event, LambdaContext())
    submitted = [log for log in logs() if log.get("message") == "job submitted"]
    assert submitted and submitted[0]["correlation_id"] == event["Records"][0]["messageId"]
    assert submitted[0]["key"] == "uploads/corr.wav"


# ---- wired for real: S3 -> SQS (with DLQ) -> handler ------------------------------------------------------

def _lambda_event_from_sqs(messages: list[dict], queue_arn: str) -> dict:
    return {"Records": [{
        "messageId": m["MessageId"], "receiptHandle": m["ReceiptHandle"], "body": m["Body"],
        "attributes": m.get("Attributes", {}), "messageAttributes": {}, "md5OfBody": m["MD5OfBody"],
        "eventSource": "aws:sqs", "eventSourceARN": queue_arn, "awsRegion": "us-east-1",
    } for m in messages]}


def test_s3_to_sqs_to_handler_with_redrive_to_dlq(app, recording, aws, pack_settings):
    """moto's own S3 notifications into SQS; a record that keeps failing ends in the DLQ. One job
    per object here: a pack's SubmitJob failing fails every record of the pack (the pack tests)."""
    pack_settings(pack_max_objects=1)
    sqs = aws.client("sqs")
    dlq_url = sqs.create_queue(QueueName="uploads-dlq")["QueueUrl"]
    dlq_arn = sqs.get_queue_attributes(QueueUrl=dlq_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    url = sqs.create_queue(QueueName="uploads", Attributes={
        "VisibilityTimeout": "0",
        "RedrivePolicy": json.dumps({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": "2"}),
    })["QueueUrl"]
    arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    aws.client("s3").put_bucket_notification_configuration(Bucket=BUCKET, NotificationConfiguration={
        "QueueConfigurations": [{"QueueArn": arn, "Events": ["s3:ObjectCreated:*"],
                                 "Filter": {"Key": {"FilterRules": [{"Name": "prefix", "Value": "uploads/"}]}}}],
    })
    sqs.purge_queue(QueueUrl=url)  # moto may have sent an s3:TestEvent
    put(aws, "uploads/ok file+1.wav")
    put(aws, "uploads/poison.wav")
    recording.fail_keys = {"poison.wav"}

    def poll_and_handle() -> dict:
        msgs = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10, AttributeNames=["All"]).get("Messages", [])
        if not msgs:
            return {}
        response = app.handler(_lambda_event_from_sqs(msgs, arn), LambdaContext())
        failed = {f["itemIdentifier"] for f in response["batchItemFailures"]}
        for m in msgs:  # what the event source mapping does with ReportBatchItemFailures
            if m["MessageId"] not in failed:
                sqs.delete_message(QueueUrl=url, ReceiptHandle=m["ReceiptHandle"])
        return response

    for _ in range(4):
        poll_and_handle()
    assert recording.inputs == [f"s3://{BUCKET}/uploads/ok file+1.wav"]
    dead = sqs.receive_message(QueueUrl=dlq_url, MaxNumberOfMessages=10).get("Messages", [])
    assert len(dead) == 1 and "poison.wav" in dead[0]["Body"]
