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
