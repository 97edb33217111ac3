"""The handler packs an invocation's objects into Batch jobs (issue #11), against moto and a
recording Batch stub: manifests, large objects, duplicates, partial failures, outcomes, metrics."""

from __future__ import annotations

import json
import re

import pytest
from test_submitter import emf_docs, metric_total
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
    outcomes,
    pack_settings,
    read_manifest,
    recording,
    s3_notification,
    s3_record,
    s3_test_event,
    sqs_event,
)

PACK_NAME_RE = re.compile(r"^pack-\d{8}T\d{6}Z-[0-9a-f]{10}$")


def uploads(*names: str, size: int = 16_000) -> list[dict]:
    """One SQS body (S3 notification) per name, each object with its own ETag."""
    return [s3_notification(s3_record(f"uploads/{n}", size=size, etag=f"etag-{n}")) for n in names]


def items(aws) -> list[dict]:
    return aws.client("dynamodb").scan(TableName=TABLE)["Items"]


def test_sqs_batch_becomes_pack_jobs_over_manifests(app, aws, pack_settings):
    pack_settings(pack_max_objects=3)
    names = [f"clip {i}.wav" for i in range(7)]
    response = app.handler(sqs_event(*uploads(*names)), LambdaContext())

    assert response == {"batchItemFailures": []}
    batch = aws.client("batch")
    ids = [j["jobId"] for j in batch.list_jobs(jobQueue=QUEUE, filters=[{"name": "JOB_NAME", "values": ["*"]}])["jobSummaryList"]]
    jobs = batch.describe_jobs(jobs=ids)["jobs"]
    assert len(jobs) == 3  # ceil(7 / 3)
    s3 = aws.client("s3")
    seen = []
    for job in jobs:
        manifest = job["parameters"]["input"]
        assert job["parameters"]["output"] == f"s3://{BUCKET}/transcripts/" and JOB_DEF in job["jobDefinition"]
        assert re.fullmatch(rf"s3://{BUCKET}/transcripts/_manifests/\d{{8}}T\d{{6}}Z-[0-9a-f]{{10}}\.jsonl", manifest)
        assert PACK_NAME_RE.match(job["jobName"]) and manifest.endswith(job["jobName"].removeprefix("pack-") + ".jsonl")
        assert job["tags"] == {"project": "whisper-batch", "component": "submitter", "source": "lambda"}
        lines = read_manifest(s3, manifest)
        for line in lines:
            name = line["input"].rsplit("/", 1)[-1]
            assert line == {"index": 0, "input": f"s3://{BUCKET}/uploads/{name}", "output": f"s3://{BUCKET}/transcripts/",
                            "etag": f"etag-{name}", "size": 16_000}
        head = s3.head_object(Bucket=BUCKET, Key=manifest.split("/", 3)[3])
        assert head["Metadata"] == {"count": str(len(lines)), "job-definition": JOB_DEF}
        assert head["ContentType"] == "application/x-ndjson"
        seen.append(sorted(line["input"].rsplit("/", 1)[-1] for line in lines))
    assert sorted(map(len, seen)) == [2, 2, 3]
    assert sorted(n for pack in seen for n in pack) == sorted(names)
    # each object's idempotency record names its pack job and manifest
    records = [json.loads(i["data"]["S"]) for i in items(aws)]
    assert len(records) == 7 and {r["jobId"] for r in records} == set(ids)
    assert all(r["manifest"].endswith(".jsonl") and r["jobName"].startswith("pack-") for r in records)


def test_large_objects_get_jobs_of_their_own(app, recording, pack_settings):
    pack_settings(pack_max_audio_seconds=60)
    long_min = app.SETTINGS.long_job_min_bytes
    talky = 61 * 8000  # a WAV estimated at 61 s > PACK_MAX_AUDIO_SECONDS, far below LONG_JOB_MIN_BYTES
    event = sqs_event(*uploads("a.wav", "b.wav"), *uploads("hour.flac", size=long_min),
                      *uploads("talky.wav", size=talky))
    assert app.handler(event, LambdaContext()) == {"batchItemFailures": []}

    by_input = {c["parameters"]["input"]: c for c in recording.calls}
    assert len(recording.calls) == 3
    hour = by_input[f"s3://{BUCKET}/uploads/hour.flac"]
    assert hour["jobDefinition"] == JOB_DEF_LONG and not hour["jobName"].startswith("pack-")
    assert by_input[f"s3://{BUCKET}/uploads/talky.wav"]["jobDefinition"] == JOB_DEF
    (pack,) = [c for c in recording.calls if "/_manifests/" in c["parameters"]["input"]]
    assert pack["jobDefinition"] == JOB_DEF
    assert sorted(recording.objects_of(pack)) == [f"s3://{BUCKET}/uploads/a.wav", f"s3://{BUCKET}/uploads/b.wav"]


def test_parallelism_spreads_a_burst_over_job_slots(app, recording, pack_settings):
    pack_settings(pack_parallelism=2)
    app.handler(sqs_event(*uploads("a.wav", "b.wav", "c.wav", "d.wav", "e.wav")), LambdaContext())
    assert sorted(len(recording.objects_of(c)) for c in recording.calls) == [2, 3]


def test_one_object_per_pack_is_todays_request_exactly(app, recording, aws, pack_settings):
    from submitter.jobs import submit_job_request
    from submitter.objects import ObjectRef

    pack_settings(pack_max_objects=1)
    names = ["a.wav", "b b.mp3", "c+d.ogg"]
    assert app.handler(sqs_event(*uploads(*names)), LambdaContext()) == {"batchItemFailures": []}

    expected = [submit_job_request(ObjectRef(BUCKET, f"uploads/{n}", f"etag-{n}", 16_000), app.SETTINGS) for n in names]
    assert sorted(recording.calls, key=lambda c: c["jobName"]) == sorted(expected, key=lambda c: c["jobName"])
    assert "Contents" not in aws.client("s3").list_objects_v2(Bucket=BUCKET, Prefix="transcripts/_manifests/")


def test_an_object_delivered_twice_is_in_one_pack(app, recording, outcomes, capsys):
    body = uploads("dup.wav")[0]
    first = app.handler(sqs_event(body, *uploads("other.wav"), body), LambdaContext())  # twice in one batch
    again = app.handler(sqs_event(body, *uploads("third.wav")), LambdaContext())         # and redelivered later

    assert first == again == {"batchItemFailures": []}
    assert sorted(recording.objects) == [f"s3://{BUCKET}/uploads/{n}" for n in ("dup.wav", "other.wav", "third.wav")]
    statuses = [(o.obj.key, o.status) for o in outcomes]
    assert statuses == [("uploads/dup.wav", "submitted"), ("uploads/other.wav", "submitted"),
                        ("uploads/dup.wav", "duplicate"), ("uploads/dup.wav", "duplicate"),
                        ("uploads/third.wav", "submitted")]
    # a duplicate names the job that has it: the first invocation's pack
    assert outcomes[2].job_id == outcomes[3].job_id == outcomes[0].job_id and outcomes[3].manifest == outcomes[0].manifest
    docs = emf_docs(capsys)
    assert metric_total(docs, "JobsSubmitted") == 2 and metric_total(docs, "ObjectsSubmitted") == 3
    assert metric_total(docs, "ObjectsSkipped", Reason="duplicate") == 2


def test_a_failed_pack_fails_only_its_records_and_the_redelivery_submits_it(app, recording, aws, outcomes,
                                                                             pack_settings, capsys):
    pack_settings(pack_parallelism=2)
    event = sqs_event(*uploads("a.wav", "b.wav", "c.wav", "d.wav"))
    recording.fail_next = 1  # the first pack's SubmitJob is throttled past the client's retries

    response = app.handler(event, LambdaContext())

    failed = {o.obj.key for o in outcomes if o.status == "failed"}
    submitted = {o.obj.key for o in outcomes if o.status == "submitted"}
    assert len(failed) == 2 and len(submitted) == 2 and len(recording.calls) == 1
    assert all("TooManyRequests" in o.error for o in outcomes if o.status == "failed")
    by_key = {json.loads(r["body"])["Records"][0]["s3"]["object"]["key"]: r["messageId"] for r in event["Records"]}
    assert sorted(f["itemIdentifier"] for f in response["batchItemFailures"]) == sorted(by_key[k] for k in failed)
    # the failed pack's claims are released; the submitted pack's records are complete
    assert len(items(aws)) == 2 and all(i["status"]["S"] == "COMPLETED" for i in items(aws))
    docs = emf_docs(capsys)
    assert metric_total(docs, "SubmitFailures") == 2 and metric_total(docs, "JobsSubmitted") == 1

    # SQS redelivers the failed records: they are submitted now (and only they)
    outcomes.clear()
    retry = sqs_event(*(json.loads(r["body"]) for r in event["Records"] if r["messageId"] in
                        {f["itemIdentifier"] for f in response["batchItemFailures"]}))
    assert app.handler(retry, LambdaContext()) == {"batchItemFailures": []}
    assert {o.obj.key for o in outcomes if o.status == "submitted"} == failed
    assert sorted(recording.objects) == [f"s3://{BUCKET}/uploads/{n}" for n in ("a.wav", "b.wav", "c.wav", "d.wav")]


def test_an_object_another_submission_holds_is_retried(app, recording, aws):
    from submitter.jobs import Clients, Submitter
    from submitter.objects import ObjectRef

    other = Submitter(app.SETTINGS, Clients.create(batch=recording, session=aws), source="bulk")
    held = ObjectRef(BUCKET, "uploads/held.wav", "etag-held.wav", 16_000)
    assert other.claim(held) is None  # e.g. a bulk run between claiming and submitting

    event = sqs_event(*uploads("held.wav", "free.wav"))
    response = app.handler(event, LambdaContext())
    assert response == {"batchItemFailures": [{"itemIdentifier": event["Records"][0]["messageId"]}]}
    assert recording.objects == [f"s3://{BUCKET}/uploads/free.wav"]

    other.release(held, RuntimeError("gave up"))
    assert app.handler(sqs_event(uploads("held.wav")[0]), LambdaContext()) == {"batchItemFailures": []}
    assert recording.objects[-1] == f"s3://{BUCKET}/uploads/held.wav"


def test_on_outcome_hears_every_object_and_cannot_break_the_handler(app, recording, outcomes, logs):
    from submitter.jobs import Outcome

    recording.fail_keys = {"x.wav"}
    event = sqs_event(
        s3_notification(s3_record("uploads/ok.wav", etag="1"), s3_record("uploads/notes.txt")),
        s3_notification(s3_record("uploads/gone.wav", event_name="ObjectRemoved:Delete")),
        s3_test_event(),
    )
    app.handler(event, LambdaContext())
    app.handler(sqs_event(s3_notification(s3_record("uploads/ok.wav", etag="1"))), LambdaContext())
    with pytest.raises(app.SubmitError):
        app.handler(eventbridge_event("uploads/x.wav"), LambdaContext())

    assert all(isinstance(o, Outcome) for o in outcomes)
    assert [(o.obj.key, o.status, o.reason) for o in outcomes] == [
        ("uploads/notes.txt", "skipped", "unsupported_extension"),
        ("uploads/gone.wav", "skipped", "not_object_created"),
        ("uploads/ok.wav", "submitted", None),
        ("uploads/ok.wav", "duplicate", "duplicate"),
        ("uploads/x.wav", "failed", None),
    ]
    submitted = outcomes[2]
    assert submitted.job_id and submitted.job_name and submitted.job_definition == JOB_DEF
    assert submitted.manifest is None and submitted.error is None  # a job of its own
    assert "TooManyRequests" in outcomes[4].error

    def broken(outcome):
        raise RuntimeError("observer bug")

    app.set_on_outcome(broken)
    assert app.handler(sqs_event(*uploads("later.wav")), LambdaContext()) == {"batchItemFailures": []}
    assert recording.objects[-1] == f"s3://{BUCKET}/uploads/later.wav"
    assert any(log.get("message") == "on_outcome callback raised; ignored" for log in logs())


def test_configure_sets_the_callback_and_keeps_it(app, recording):
    seen = []
    app.configure(on_outcome=seen.append)
    app.configure(settings=app.SETTINGS)  # on_outcome=None keeps it
    app.handler(sqs_event(*uploads("cb.wav")), LambdaContext())
    assert [o.status for o in seen] == ["submitted"]
    app.set_on_outcome(None)
    app.handler(sqs_event(*uploads("cb2.wav")), LambdaContext())
    assert len(seen) == 1


def test_direct_invocations_pack_too(app, recording):
    event = s3_notification(*(s3_record(f"uploads/{n}.wav", etag=n) for n in ("x", "y", "z")))
    assert app.handler(event, LambdaContext()) == {"submitted": 3, "jobs": 1, "duplicates": 0, "skipped": 0, "failed": 0}
    (call,) = recording.calls
    assert PACK_NAME_RE.match(call["jobName"]) and len(recording.objects_of(call)) == 3


def test_pack_logs_name_the_manifest_per_record(app, recording, logs):
    event = sqs_event(*uploads("l1.wav", "l2.wav"))
    app.handler(event, LambdaContext())
    submitted = [log for log in logs() if log.get("message") == "job submitted"]
    assert [s["correlation_id"] for s in submitted] == [r["messageId"] for r in event["Records"]]
    assert submitted[0]["manifest"] == submitted[1]["manifest"] and submitted[0]["manifest"].endswith(".jsonl")
    assert submitted[0]["job_id"] == submitted[1]["job_id"]
