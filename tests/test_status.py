import json

import boto3
import pytest
from moto import mock_aws

from batch_job.cli import main
from batch_job.status.reader import read_markers
from batch_job.status.records import summarize


@pytest.fixture
def bucket(monkeypatch):
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x")
    with mock_aws():
        s3 = boto3.client("s3")
        s3.create_bucket(Bucket="status-b")
        for i in range(6):
            s3.put_object(Bucket="status-b", Key=f"in/a{i}.wav", Body=b"x")
        for i in range(3):
            job = {"audio_seconds": 3600.0, "real_time_factor": 0.1 * (i + 1), "cost": {"total_usd": 0.5}}
            body = {"job": job, "warnings": [{"code": "w"}] if i == 0 else []}
            s3.put_object(Bucket="status-b", Key=f"out/in/a{i}.wav.json", Body=json.dumps(body))
            s3.put_object(Bucket="status-b", Key=f"out/in/a{i}.wav.txt", Body=b"t")
        s3.put_object(Bucket="status-b", Key="out/in/a3.wav.error.json",
                      Body=json.dumps({"reason": "corrupt_audio", "retryable": False, "exit_code": 65}))
        yield s3


def test_counts_match_markers(bucket):
    recs = read_markers(bucket, "status-b", "out/", threads=4)
    inputs = {f"in/a{i}.wav" for i in range(6)}
    s = summarize(recs, inputs)
    assert (s.done, s.failed, s.warned, s.pending) == (3, 1, 1, 2)
    assert s.failures == {"corrupt_audio": ["in/a3.wav"]}
    assert s.audio_hours == 3.0 and s.cost_usd == 1.5 and s.rtf_median == pytest.approx(0.2)


def test_cli_json_and_bad_uri(bucket, capsys):
    assert main(["status", "s3://status-b/out/", "--input", "s3://status-b/in/", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["done"] == 3 and report["pending"] == 2 and report["failures"]["corrupt_audio"]["count"] == 1
    assert main(["status", "not-a-uri"]) == 2
    assert main(["status", "s3://no-such-bucket/out/"]) == 2


def test_marker_gone_between_listing_and_get_is_skipped(bucket, monkeypatch):
    from batch_job.status import reader

    listed = list(reader.list_keys(bucket, "status-b", "out/"))
    monkeypatch.setattr(reader, "list_keys", lambda *a, **k: iter([*listed, "out/in/gone.wav.error.json"]))
    s = summarize(reader.read_markers(bucket, "status-b", "out/", threads=2))
    assert (s.done, s.failed) == (3, 1) and "in/gone.wav" not in s.failures.get("corrupt_audio", [])


def test_presigned_path_and_its_fallback_read_the_same_bodies(bucket, monkeypatch):
    from batch_job.status import reader

    client = reader.s3_client(2)
    client.put_object(Bucket="status-b", Key="out/in/sp ace+é.wav.json", Body=b'{"job": {}}')
    getter = reader.MarkerGetter(client)
    assert getter._fast("status-b", "out/in/sp ace+é.wav.json").status_code == 200
    fast = getter.body("status-b", "out/in/sp ace+é.wav.json")
    calls = []

    def broken(*args):
        calls.append(args)
        raise ConnectionError("endpoint down")
    monkeypatch.setattr(getter, "_fast", broken)
    assert getter.body("status-b", "out/in/sp ace+é.wav.json") == fast == b'{"job": {}}' and calls
    assert getter.body("status-b", "out/in/nothing.json") is None
