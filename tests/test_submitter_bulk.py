"""``whisper-batch submit s3://BUCKET/PREFIX/`` (submitter.bulk) against moto S3, DynamoDB and Batch."""

from __future__ import annotations

import argparse
import io

from test_submitter_support import (  # noqa: F401 - fixtures
    BUCKET,
    JOB_DEF,
    JOB_DEF_LONG,
    QUEUE,
    TABLE,
    LambdaContext,
    RecordingBatch,
    app,
    aws,
    put,
    read_manifest,
    s3_notification,
    s3_record,
    sqs_event,
)


def fast_put(keys_and_bodies: dict[str, bytes]) -> None:
    """Objects straight into moto's S3 backend (a thousand PutObject round trips are slow)."""
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends

    backend = s3_backends[DEFAULT_ACCOUNT_ID]["global"]
    for key, body in keys_and_bodies.items():
        backend.put_object(BUCKET, key, body)


def run_bulk(uri: str, *extra: str, clients=None) -> tuple[int, str]:
    from submitter import bulk

    parser = argparse.ArgumentParser()
    bulk.register(parser.add_subparsers())
    args = parser.parse_args(["submit", uri, *extra])
    out = io.StringIO()
    code = bulk.run(args, clients=clients, out=out)
    return code, out.getvalue()


def batch_jobs(aws) -> list[dict]:
    batch = aws.client("batch")
    ids = [j["jobId"] for j in batch.list_jobs(jobQueue=QUEUE, filters=[{"name": "JOB_NAME", "values": ["*"]}])["jobSummaryList"]]
    return batch.describe_jobs(jobs=ids)["jobs"] if ids else []


def job_objects(aws, job: dict) -> list[str]:
    """The object URIs a job covers: its input, or the lines of its pack manifest."""
    uri = job["parameters"]["input"]
    return [line["input"] for line in read_manifest(aws.client("s3"), uri)] if "/_manifests/" in uri else [uri]


def test_small_listing_submits_one_job_per_pack(aws, app):
    for key in ("uploads/a.wav", "uploads/sub dir/b+c.MP3", "uploads/notes.txt", "uploads/folder/",
                "elsewhere/x.wav", "transcripts/uploads/a.wav.json"):
        put(aws, key, b"" if key.endswith("/") else b"audio")
    put(aws, "uploads/empty.flac", b"")
    # the handler already submitted one of them
    meta = put(aws, "uploads/done.ogg", b"done")
    app.handler(sqs_event(s3_notification(s3_record("uploads/done.ogg", **meta))), LambdaContext())

    code, out = run_bulk(f"s3://{BUCKET}/")

    assert code == 0, out
    lines = out.splitlines()
    status = {line.split()[1]: line.split()[0] for line in lines if line.startswith(("submitted", "skipped", "duplicate"))}
    assert status == {
        f"s3://{BUCKET}/uploads/a.wav": "submitted",
        f"s3://{BUCKET}/uploads/sub": "submitted",  # "sub dir/b+c.MP3" (split on the space)
        f"s3://{BUCKET}/uploads/notes.txt": "skipped",
        f"s3://{BUCKET}/uploads/folder/": "skipped",
        f"s3://{BUCKET}/uploads/empty.flac": "skipped",
        f"s3://{BUCKET}/elsewhere/x.wav": "skipped",
        f"s3://{BUCKET}/transcripts/uploads/a.wav.json": "skipped",
        f"s3://{BUCKET}/uploads/done.ogg": "duplicate",
    }
    assert "reason=unsupported_extension" in out and "reason=under_output_prefix" in out
    assert "reason=empty_object" in out and "reason=outside_input_prefix" in out
    assert lines[-1].startswith("summary: 8 listed, 2 submitted in 1 job(s), 6 skipped (")
    (pack_line,) = [line for line in lines if line.startswith("pack job ")]
    assert ": 2 objects, definition=whisper-batch-job, manifest=s3://audio-bucket/transcripts/_manifests/" in pack_line
    jobs = batch_jobs(aws)
    assert sorted(uri for j in jobs for uri in job_objects(aws, j)) == [
        f"s3://{BUCKET}/uploads/a.wav", f"s3://{BUCKET}/uploads/done.ogg", f"s3://{BUCKET}/uploads/sub dir/b+c.MP3"]

    # same idempotency both ways: a re-run and a late notification submit nothing new
    code, again = run_bulk(f"s3://{BUCKET}/uploads/")
    assert code == 0 and not any(ln.startswith("submitted") for ln in again.splitlines()) and again.count("duplicate ") == 3
    etag = aws.client("s3").head_object(Bucket=BUCKET, Key="uploads/a.wav")["ETag"].strip('"')
    result = app.handler(s3_notification(s3_record("uploads/a.wav", size=5, etag=etag)), LambdaContext())
    assert result["duplicates"] == 1 and len(batch_jobs(aws)) == 2


def test_large_listing_becomes_array_jobs_of_packs(aws, app):
    n = 1003
    fast_put({f"uploads/bulk/{i:05d} take.wav": b"x" * 10 for i in range(n)})
    fast_put({"uploads/bulk/long-1.flac": b"y" * 500, "uploads/bulk/long-2.flac": b"z" * 500,
              "uploads/bulk/readme.md": b"text"})

    code, out = run_bulk(f"s3://{BUCKET}/uploads/bulk/", "--long-job-min-bytes", "100")

    assert code == 0, out[-2000:]
    assert out.count("queued ") == n + 2 and "skipped    s3://audio-bucket/uploads/bulk/readme.md" in out
    assert out.splitlines()[-1].startswith(f"summary: {n + 3} listed, {n + 2} submitted in 2 job(s), 1 skipped")
    parents = [j for j in batch_jobs(aws) if "arrayProperties" in j and "size" in j["arrayProperties"]]
    n_packs = -(-n // 50)  # PACK_MAX_OBJECTS 50 (default): 21 packs of the 1003 small objects
    # the two long objects go alone: an array of two one-object packs
    assert sorted(j["arrayProperties"]["size"] for j in parents) == [2, n_packs]
    assert "array job bulk-" in out and f": {n_packs} packs, {n} objects, definition={JOB_DEF}," in out
    by_def = {(JOB_DEF_LONG if JOB_DEF_LONG in j["jobDefinition"] else JOB_DEF): j for j in parents}

    std = by_def[JOB_DEF]
    manifest_uri = std["parameters"]["input"]
    assert std["parameters"]["output"] == f"s3://{BUCKET}/transcripts/"
    assert manifest_uri.startswith(f"s3://{BUCKET}/transcripts/_manifests/") and manifest_uri.endswith(".jsonl")
    lines = read_manifest(aws.client("s3"), manifest_uri)
    assert len(lines) == n and {line["input"] for line in lines} == {
        f"s3://{BUCKET}/uploads/bulk/{i:05d} take.wav" for i in range(n)}
    per_element = [sum(1 for line in lines if line["index"] == i) for i in range(n_packs)]
    assert sorted(per_element) == [47] * 5 + [48] * 16 and sum(per_element) == n  # balanced, <= 50
    line = next(x for x in lines if x["input"].endswith("/00007 take.wav"))
    assert line == {"index": line["index"], "input": f"s3://{BUCKET}/uploads/bulk/00007 take.wav",
                    "output": f"s3://{BUCKET}/transcripts/", "etag": line["etag"], "size": 10}
    assert f"array={std['jobName']}[{line['index']}] id={std['jobId']}:{line['index']}" in out
    long_lines = read_manifest(aws.client("s3"), by_def[JOB_DEF_LONG]["parameters"]["input"])
    assert [(x["index"], x["input"].rsplit("/", 1)[-1]) for x in long_lines] == [(0, "long-1.flac"), (1, "long-2.flac")]

    # every element holds a COMPLETED idempotency record: the handler will not submit them again
    head = aws.client("s3").head_object(Bucket=BUCKET, Key="uploads/bulk/00007 take.wav")
    result = app.handler(s3_notification(s3_record("uploads/bulk/00007 take.wav", size=10,
                                                   etag=head["ETag"].strip('"'))), LambdaContext())
    assert result["duplicates"] == 1 and result["submitted"] == 0


def test_cli_entry_point_and_config_errors(aws, monkeypatch, capsys):
    from batch_job.cli import build_parser, main

    assert "submit" in build_parser()._subparsers._group_actions[0].choices
    put(aws, "uploads/cli.wav", b"audio")
    assert main(["submit", f"s3://{BUCKET}/uploads/", "--dry-run"]) == 0
    assert "would      s3://audio-bucket/uploads/cli.wav" in capsys.readouterr().out
    assert batch_jobs(aws) == []

    monkeypatch.delenv("JOB_QUEUE")
    monkeypatch.setenv("MAX_OBJECT_BYTES", "lots")
    assert main(["submit", f"s3://{BUCKET}/uploads/"]) == 78
    err = capsys.readouterr().err
    assert "JOB_QUEUE is not set" in err and "MAX_OBJECT_BYTES='lots' is not an integer" in err
    assert main(["submit", f"s3://{BUCKET}/uploads/", "--job-queue", QUEUE]) == 78  # MAX_OBJECT_BYTES still bad
    monkeypatch.setenv("MAX_OBJECT_BYTES", "1000")
    assert main(["submit", f"s3://{BUCKET}/uploads/", "--job-queue", QUEUE]) == 0
    assert len(batch_jobs(aws)) == 1
    assert main(["submit", "not-a-uri"]) == 78


def test_failed_array_submit_releases_the_claims(aws, app):
    from submitter.jobs import Clients

    fast_put({f"uploads/f/{i}.wav": b"x" for i in range(5)})
    flags = ("--array-threshold", "2", "--pack-max-objects", "2")  # 3 packs: one array of 3
    failing = RecordingBatch()
    failing.fail_next = 100
    code, out = run_bulk(f"s3://{BUCKET}/uploads/f/", *flags, clients=Clients.create(batch=failing, session=aws))
    assert code == 1 and out.count("failed ") == 5 and "TooManyRequests" in out
    assert aws.client("dynamodb").scan(TableName=TABLE)["Items"] == []  # nothing blocks a re-run

    code, out = run_bulk(f"s3://{BUCKET}/uploads/f/", *flags)
    assert code == 0 and out.count("queued ") == 5 and ": 3 packs, 5 objects," in out
    (parent,) = [j for j in batch_jobs(aws) if "size" in j.get("arrayProperties", {})]
    assert parent["arrayProperties"]["size"] == 3


def starting(out: str, prefix: str) -> int:
    """How many printed lines start with ``prefix`` (one per object of that status)."""
    return sum(line.startswith(prefix) for line in out.splitlines())


def _marker_job_ids(aws) -> dict[str, str]:
    """input URI -> the job id each object's (completed) idempotency record names, via Batch."""
    return {uri: j["jobId"] for j in batch_jobs(aws) for uri in job_objects(aws, j)}


def test_failed_only_resubmits_retryable_and_fixed_failures(aws, app):
    import json

    s3 = aws.client("s3")
    names = ["done", "transient", "model", "corrupt", "pending", "replaced", "stale_err", "again"]
    meta = {n: put(aws, f"uploads/r/{n}.wav", f"audio {n}".encode()) for n in names}
    code, first = run_bulk(f"s3://{BUCKET}/uploads/r/")
    assert code == 0 and starting(first, "submitted ") == len(names)
    job_of = _marker_job_ids(aws)

    def marker(name: str, body: dict, suffix: str = ".error.json") -> None:
        s3.put_object(Bucket=BUCKET, Key=f"transcripts/uploads/r/{name}.wav{suffix}", Body=json.dumps(body))

    def failure(name: str, reason: str, code: int, retryable: bool, etag: str | None = None) -> dict:
        return {"reason": reason, "message": "m", "retryable": retryable, "exit_code": code,
                "source": {"bucket": BUCKET, "key": f"uploads/r/{name}.wav", "etag": etag or meta[name]["etag"]},
                "job_id": job_of[f"s3://{BUCKET}/uploads/r/{name}.wav"]}

    def done(name: str, etag: str | None = None) -> dict:
        return {"text": "t", "source": {"etag": etag or meta[name]["etag"]}, "job": {}}

    marker("done", done("done"), ".json")
    marker("transient", failure("transient", "s3_error", 75, True))
    marker("model", failure("model", "model_error", 78, False))
    marker("corrupt", failure("corrupt", "corrupt_audio", 65, False))
    marker("replaced", failure("replaced", "s3_error", 75, True, etag="0" * 32))
    marker("stale_err", failure("stale_err", "interrupted", 75, True))
    marker("stale_err", done("stale_err"), ".json")  # succeeded after: the error marker is stale
    marker("again", done("again", etag="1" * 32), ".json")  # an older version was transcribed
    marker("again", failure("again", "internal_error", 70, True))

    code, out = run_bulk(f"s3://{BUCKET}/uploads/r/", "--failed-only", "--dry-run")
    assert code == 0 and starting(out, "would ") == 3 and len(batch_jobs(aws)) == 1
    code, out = run_bulk(f"s3://{BUCKET}/uploads/r/", "--failed-only")

    assert code == 0, out
    status = {ln.split()[1].rsplit("/", 1)[1]: ln.split(None, 2)[0::2] for ln in out.splitlines()
              if ln.startswith(("submitted", "skipped", "duplicate"))}
    assert {k: v[0] for k, v in status.items()} == {
        "done.wav": "skipped", "transient.wav": "submitted", "model.wav": "submitted", "corrupt.wav": "skipped",
        "pending.wav": "skipped", "replaced.wav": "skipped", "stale_err.wav": "skipped", "again.wav": "submitted"}
    assert status["done.wav"][1] == "reason=already_done" and status["stale_err.wav"][1] == "reason=already_done"
    assert status["corrupt.wav"][1] == "reason=failed_permanently failure=corrupt_audio exit_code=65"
    assert status["pending.wav"][1] == "reason=no_failure_marker"
    assert status["replaced.wav"][1] == "reason=marker_for_other_etag failure=s3_error exit_code=75"
    assert out.splitlines()[-2].startswith("summary: 8 listed, 3 submitted in 1 job(s), 5 skipped (already_done=2, ")
    assert out.splitlines()[-1] == ("failed-only: 3 run again (fixed:model_error=1, retryable:internal_error=1, "
                                    "retryable:s3_error=1)")
    new_job = [j for j in batch_jobs(aws) if j["jobId"] not in job_of.values()]
    assert len(new_job) == 1 and sorted(job_objects(aws, new_job[0])) == [
        f"s3://{BUCKET}/uploads/r/{n}.wav" for n in ("again", "model", "transient")]

    # a second run before the new job wrote anything does not submit the objects twice ...
    code, out = run_bulk(f"s3://{BUCKET}/uploads/r/", "--failed-only")
    assert code == 0 and starting(out, "submitted ") == 0 and out.count("reason=already_resubmitted") == 3
    assert f"id={new_job[0]['jobId']}" in out and len(batch_jobs(aws)) == 2
    # ... and plain submit still sees them as submitted (the records are completed with the new job)
    code, out = run_bulk(f"s3://{BUCKET}/uploads/r/")
    assert code == 0 and starting(out, "duplicate ") == 8 and len(batch_jobs(aws)) == 2
    # when the new job fails too, its marker names it, and --failed-only runs the object again
    marker("transient", {**failure("transient", "s3_error", 75, True), "job_id": new_job[0]["jobId"]})
    code, out = run_bulk(f"s3://{BUCKET}/uploads/r/", "--failed-only")
    assert code == 0 and starting(out, "submitted ") == 1 and "submitted  s3://audio-bucket/uploads/r/transient.wav" in out


def test_failed_only_without_a_record_or_job_id_still_resubmits(aws, app):
    import json

    meta = put(aws, "uploads/n/x.flac", b"flac bytes")
    body = {"reason": "device_unavailable", "retryable": True, "exit_code": 75, "source": {"etag": meta["etag"]}}
    aws.client("s3").put_object(Bucket=BUCKET, Key="transcripts/uploads/n/x.flac.error.json", Body=json.dumps(body))
    code, out = run_bulk(f"s3://{BUCKET}/uploads/n/", "--failed-only")  # no idempotency record at all
    assert code == 0 and "submitted  s3://audio-bucket/uploads/n/x.flac" in out
    assert out.splitlines()[-1] == "failed-only: 1 run again (retryable:device_unavailable=1)"
