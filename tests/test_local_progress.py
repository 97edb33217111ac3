"""Local mode's per-file progress (batch_job/local/progress.py) on moto S3: packs report every file.

Fast and deterministic: the submitter's outcomes and LocalBatch's job events are fed by hand,
the markers are written as the worker writes them.
"""

from __future__ import annotations

import json
import re

import pytest

boto3 = pytest.importorskip("boto3")
moto = pytest.importorskip("moto")

from batch_job.job import error_marker_key, marker_key  # noqa: E402
from batch_job.local.progress import Progress  # noqa: E402
from submitter.jobs import Outcome  # noqa: E402
from submitter.objects import ObjectRef  # noqa: E402

BUCKET = "whisper-batch"
OUT = "transcripts/"


@pytest.fixture
def s3():
    with moto.mock_aws():
        client = boto3.client("s3", region_name="us-east-1")
        client.create_bucket(Bucket=BUCKET)
        yield client


@pytest.fixture
def lines():
    return []


@pytest.fixture
def progress(s3, lines):
    return Progress(s3, BUCKET, OUT, lambda what, key, detail="": lines.append(f"{what} {key} {detail}"))


def put_manifest(s3, name: str, rows: list[tuple[int, str, str]]) -> str:
    key = f"{OUT}_manifests/{name}.jsonl"
    body = "\n".join(json.dumps({"index": i, "input": f"s3://{BUCKET}/{k}", "output": f"s3://{BUCKET}/{OUT}",
                                 "etag": etag, "size": 10}) for i, k, etag in rows) + "\n"
    s3.put_object(Bucket=BUCKET, Key=key, Body=body.encode())
    return f"s3://{BUCKET}/{key}"


def put_marker(s3, key: str, etag: str) -> None:
    s3.put_object(Bucket=BUCKET, Key=marker_key(OUT, key),
                  Body=json.dumps({"text": "hi", "source": {"bucket": BUCKET, "key": key, "etag": etag}}).encode())


def put_error(s3, key: str, etag: str, reason: str = "corrupt_audio", retryable: bool = False) -> None:
    s3.put_object(Bucket=BUCKET, Key=error_marker_key(OUT, key),
                  Body=json.dumps({"reason": reason, "message": "bad bytes", "retryable": retryable,
                                   "source": {"bucket": BUCKET, "key": key, "etag": etag}}).encode())


def job(job_id: str, input_uri: str, *, attempts: int = 1, index: int | None = None, **extra) -> dict:
    return {"jobId": job_id, "jobName": "pack-x", "parameters": {"input": input_uri, "output": f"s3://{BUCKET}/{OUT}"},
            "attempts": attempts, "arrayIndex": index, "exitCode": extra.get("exitCode"),
            "statusReason": extra.get("statusReason"), "log": None}


def said(lines: list[str], what: str, key: str) -> bool:
    return any(re.match(rf"{what} {re.escape(key)}( |$)", line) for line in lines)


def test_a_pack_reports_each_file_as_its_marker_appears(s3, progress, lines):
    manifest = put_manifest(s3, "p1", [(0, "audio/a.wav", "ea"), (0, "audio/b.wav", "eb"), (0, "audio/c.wav", "ec")])
    for key in ("audio/a.wav", "audio/b.wav", "audio/c.wav"):
        progress.on_outcome(Outcome(ObjectRef(BUCKET, key, "e" + key[6]), "submitted", job_id="j1",
                                    job_name="pack-x", manifest=manifest))
    assert said(lines, "queued", "audio/a.wav") and "pack p1.jsonl" in lines[0]

    progress.on_job_event("running", job("j1", manifest))
    assert all(said(lines, "running", f"audio/{n}.wav") for n in "abc")
    put_marker(s3, "audio/a.wav", "ea")
    put_marker(s3, "audio/b.wav", "stale")  # an older version's marker: not this file's
    progress.poll()
    assert said(lines, "done", "audio/a.wav") and not said(lines, "done", "audio/b.wav")
    assert progress.final["audio/a.wav"].status == "succeeded"

    # the job ends (exit 65: c was bad); b's marker arrived meanwhile
    put_marker(s3, "audio/b.wav", "eb")
    put_error(s3, "audio/c.wav", "ec")
    progress.on_job_event("failed", job("j1", manifest, exitCode=65))
    assert [line.split()[0] for line in lines].count("done") == 2  # a is not reported twice
    assert progress.final["audio/b.wav"].status == "succeeded"
    assert progress.final["audio/c.wav"].status == "failed"
    assert progress.final["audio/c.wav"].detail["reason"] == "corrupt_audio"
    assert any(line.startswith("failed audio/c.wav corrupt_audio: bad bytes") for line in lines)


def test_retrying_and_requeued_jobs_are_not_final(s3, progress, lines):
    progress.on_job_event("running", job("j2", f"s3://{BUCKET}/audio/x.flac"))
    put_error(s3, "audio/x.flac", "ex", reason="s3_error", retryable=True)
    progress.on_job_event("retrying", job("j2", f"s3://{BUCKET}/audio/x.flac", exitCode=75))
    assert said(lines, "retrying", "audio/x.flac") and "audio/x.flac" not in progress.final

    progress.on_job_event("running", job("j2", f"s3://{BUCKET}/audio/x.flac", attempts=2))
    progress.on_job_event("requeued", job("j2", f"s3://{BUCKET}/audio/x.flac", attempts=2))
    assert said(lines, "requeued", "audio/x.flac") and "audio/x.flac" not in progress.final


def test_array_element_is_the_lines_with_its_index(s3, progress):
    manifest = put_manifest(s3, "arr", [(0, "audio/a.wav", "ea"), (1, "audio/b.wav", "eb"), (1, "audio/c.wav", "ec")])
    assert progress.keys_of(job("arr:1", manifest, index=1)) == {"audio/b.wav": "eb", "audio/c.wav": "ec"}
    assert progress.keys_of(job("arr:0", manifest, index=0)) == {"audio/a.wav": "ea"}


def test_skips_and_dead_letters_are_final(progress, lines):
    progress.on_outcome(Outcome(ObjectRef(BUCKET, "audio/notes.txt", "e1"), "skipped", reason="unsupported_extension"))
    progress.on_outcome(Outcome(ObjectRef(BUCKET, "audio/a.wav", "e2"), "duplicate", job_name="a_wav-1"))
    progress.on_outcome(Outcome(ObjectRef(BUCKET, "audio/b.wav", "e3"), "failed", error="ThrottlingException"))
    progress.on_dead_letter("audio/b.wav", "e3", "ThrottlingException")
    assert progress.final["audio/notes.txt"].detail == {"reason": "unsupported_extension"}
    assert said(lines, "duplicate", "audio/a.wav") and "audio/a.wav" not in progress.final
    assert said(lines, "submitter", "audio/b.wav") and progress.final["audio/b.wav"].status == "skipped"


def test_a_job_running_before_its_outcome_still_prints_queued_first(s3, progress, lines):
    """LocalBatch may start a job before the submitter reports its outcomes (they follow SubmitJob)."""
    import time

    progress.on_job_event("running", job("j9", f"s3://{BUCKET}/audio/early.wav") | {"createdAt": time.time()})
    assert not said(lines, "running", "audio/early.wav")
    progress.on_outcome(Outcome(ObjectRef(BUCKET, "audio/early.wav", "ee"), "submitted", job_id="j9", job_name="x"))
    assert [line.split()[0] for line in lines] == ["queued", "running"]
    # a job resumed after a restart (created before this session) gets no outcome: it says running at once
    progress.on_job_event("running", job("j0", f"s3://{BUCKET}/audio/old.wav") | {"createdAt": 1.0})
    assert said(lines, "running", "audio/old.wav")
