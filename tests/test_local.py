"""Local mode end to end: `whisper-batch local` as a real process, rclone + moto_server on loopback,
the real submitter handler and real `run-job` processes transcribing real speech with tiny.en.

One local-mode instance is shared by the module (stopped and restarted by the restart test);
the model cache is the session's (converted once, before the first job).
"""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

boto3 = pytest.importorskip("boto3")
pytest.importorskip("aws_lambda_powertools")
pytest.importorskip("moto")

from conftest import reference_text, shared_clip, truncated_wav  # noqa: E402

from batch_job.local import ACCESS_KEY_ID, REGION, SECRET_ACCESS_KEY  # noqa: E402
from batch_job.local.s3server import ServerError, find_rclone  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BUCKET = "whisper-batch"
JOB_TIMEOUT = 300.0
CLIP_A = "jfk.flac"
CLIP_B = "librispeech_61-70968-0000.flac"

try:
    find_rclone()
except ServerError as _exc:  # pragma: no cover - the [local] extra is not installed
    pytest.skip(str(_exc), allow_module_level=True)


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", text.lower())


def assert_transcript_matches(text: str, clip: str) -> None:
    """At least 80% of the reference words appear in the transcript (tiny.en is good, not perfect)."""
    expected = words(reference_text(clip))
    got = set(words(text))
    found = [w for w in expected if w in got]
    assert len(found) >= 0.8 * len(expected), f"transcript {text!r} misses words of {expected}"


# ---------------------------------------------------------------------------- fast unit tests
def _fake_batch(tmp_path, workers: int = 1, **kwargs):
    """LocalBatch whose 'entrypoint' exits with the code named by the input parameter."""
    from batch_job.local.executor import LocalBatch, default_job_definitions

    events: list[tuple[str, str, int]] = []
    batch = LocalBatch(tmp_path, workers=workers, stop_timeout=5, env={"PATH": os.environ.get("PATH", "")},
                       job_definitions=default_job_definitions("s3://b/transcripts/"),
                       entrypoint=(sys.executable, "-c", "import sys, time; time.sleep(float(sys.argv[5] or 0)); "
                                                          "sys.exit(int(sys.argv[3]))"),
                       on_event=lambda kind, job: events.append((kind, job["jobId"], job["attempts"])), **kwargs)
    return batch, events


def _submit(batch, code: int, sleep: str = "0", **extra):
    return batch.submit_job(jobName="job-1", jobQueue="whisper-batch-local", jobDefinition="whisper-batch-job",
                            parameters={"input": str(code), "output": sleep}, **extra)["jobId"]


def _wait_final(batch, job_id: str, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = batch.describe(job_id)
        if job["status"] in ("SUCCEEDED", "FAILED"):
            return job
        time.sleep(0.05)
    raise AssertionError(batch.describe(job_id))


def test_executor_retry_rules_match_the_job_definition(tmp_path):
    from batch_job import exit_codes

    batch, events = _fake_batch(tmp_path)
    batch.start()
    try:
        ok, permanent, config = _submit(batch, 0), _submit(batch, exit_codes.INPUT_ERROR), _submit(batch, 78)
        transient, internal = _submit(batch, exit_codes.TRANSIENT), _submit(batch, exit_codes.INTERNAL)
        assert _wait_final(batch, ok)["status"] == "SUCCEEDED"
        for job_id, attempts in ((permanent, 1), (config, 1), (transient, 3), (internal, 3)):
            job = _wait_final(batch, job_id)
            assert (job["status"], job["attempts"]) == ("FAILED", attempts), job
        assert [e[0] for e in events if e[1] == transient] == [
            "queued", "running", "retrying", "running", "retrying", "running", "failed"]
    finally:
        batch.stop()
        batch.close()


def test_executor_validates_like_batch_and_substitutes_parameters(tmp_path):
    from botocore.exceptions import ClientError

    batch, _ = _fake_batch(tmp_path)
    for bad in ({"jobName": "-bad name"}, {"jobQueue": "nope"}, {"jobDefinition": "nope:3"},
                {"parameters": {"input": 1}}, {"arrayProperties": {"size": 1}}):
        request = {"jobName": "j", "jobQueue": "whisper-batch-local", "jobDefinition": "whisper-batch-job",
                   "parameters": {"input": "s3://b/k"}, **bad}
        with pytest.raises(ClientError) as info:
            batch.submit_job(**request)
        assert info.value.response["Error"]["Code"] == "ClientException"
    job_id = batch.submit_job(jobName="j", jobQueue="whisper-batch-local",
                              jobDefinition="arn:aws:batch:us-east-1:1:job-definition/whisper-batch-job-long:7",
                              parameters={"input": "s3://b/a b;$(rm -rf x).wav"})["jobId"]
    row = batch._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
    argv, env, _, policy = batch._command(row)
    assert argv[-4:] == ["--input", "s3://b/a b;$(rm -rf x).wav", "--output", "s3://b/transcripts/"]
    assert env["AWS_BATCH_JOB_ID"] == job_id and policy["timeout"] == 6 * 3600
    batch.close()


def test_executor_queue_survives_restart_and_stop_requeues_running_job(tmp_path):
    batch, events = _fake_batch(tmp_path)
    batch.start()
    running = _submit(batch, 0, sleep="30")
    queued = _submit(batch, 0)
    deadline = time.monotonic() + 10
    while batch.describe(running)["status"] != "RUNNING" and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    assert batch.stop() == 2  # the running one was SIGTERMed and requeued, the other never started
    assert batch.describe(running)["status"] == "RUNNABLE" and batch.describe(running)["attempts"] == 0
    assert ("requeued", running, 0) in events
    batch.close()

    again, _ = _fake_batch(tmp_path, workers=2)  # the requeued one sleeps 30 s again
    assert again.start() == 2
    try:
        assert _wait_final(again, queued)["status"] == "SUCCEEDED"
    finally:
        again.stop(timeout=1)
        again.close()


def test_watcher_delivers_the_stack_event_shape_once(tmp_path):
    from datetime import datetime, timedelta, timezone
    from urllib.parse import unquote_plus

    from batch_job.local.watcher import Watcher

    modified = datetime.now(timezone.utc) - timedelta(seconds=5)
    listing = [{"Key": "audio/a b+c é.wav", "ETag": '"abc"', "Size": 3, "LastModified": modified},
               {"Key": "audio/dir/", "ETag": '"d"', "Size": 0, "LastModified": modified}]

    class FakeS3:
        def get_paginator(self, name):
            return type("P", (), {"paginate": lambda self, **kw: [{"Contents": listing}]})()

    events: list[dict] = []
    answers = [{"batchItemFailures": [{"itemIdentifier": "x"}]}]

    def deliver(event):
        events.append(event)
        answer = answers.pop(0) if answers else {"batchItemFailures": []}
        if answer["batchItemFailures"]:
            answer = {"batchItemFailures": [{"itemIdentifier": event["Records"][0]["messageId"]}]}
        return answer

    state = tmp_path / "watcher.json"
    watcher = Watcher(FakeS3(), "whisper-batch", "audio/", state, deliver, retry_delay=0.2)
    assert watcher.poll() == 0  # the handler reported the message failed: redelivered after a backoff
    assert watcher.poll() == 0 and len(events) == 1
    time.sleep(0.25)
    assert watcher.poll() == 1
    assert watcher.poll() == 0  # delivered once
    assert Watcher(FakeS3(), "whisper-batch", "audio/", state, deliver).poll() == 0  # remembered
    record = events[-1]["Records"][0]
    assert record["eventSource"] == "aws:sqs" and record["attributes"]["ApproximateReceiveCount"] == "2"
    s3 = json.loads(record["body"])["Records"][0]
    assert s3["eventName"] == "ObjectCreated:Put" and s3["s3"]["bucket"]["name"] == "whisper-batch"
    assert s3["s3"]["object"]["key"] == "audio/a+b%2Bc+%C3%A9.wav"
    assert unquote_plus(s3["s3"]["object"]["key"]) == "audio/a b+c é.wav"
    assert s3["s3"]["object"]["eTag"] == "abc" and s3["s3"]["object"]["size"] == 3


def _listing_s3(listing: list[dict]):
    """(an S3 client class whose one listing page is ``listing``, the events delivered, a deliver
    that records them and reports no failure)."""
    class FakeS3:
        def get_paginator(self, name):
            return type("P", (), {"paginate": lambda self, **kw: [{"Contents": list(listing)}]})()

    events: list[dict] = []

    def deliver(event):
        events.append(event)
        return {"batchItemFailures": []}

    return FakeS3, events, deliver


def test_watcher_batching_window_holds_a_burst_together(tmp_path):
    """Settled objects wait while more of the burst is still arriving (as the stack's batching
    window does), but never longer than batch_window."""
    from datetime import datetime, timedelta, timezone

    from batch_job.local.watcher import Watcher

    now = datetime.now(timezone.utc)
    listing = [{"Key": "audio/a.wav", "ETag": '"a"', "Size": 3, "LastModified": now - timedelta(seconds=5)},
               {"Key": "audio/b.wav", "ETag": '"b"', "Size": 3, "LastModified": now}]

    FakeS3, events, deliver = _listing_s3(listing)

    watcher = Watcher(FakeS3(), "whisper-batch", "audio/", tmp_path / "w.json", deliver, settle=0.5, batch_window=30)
    assert watcher.poll() == 0 and events == []  # b is still arriving: a waits for it
    time.sleep(0.6)
    assert watcher.poll() == 2 and [len(e["Records"]) for e in events] == [2]  # one event for the burst

    listing.append({"Key": "audio/c.wav", "ETag": '"c"', "Size": 3, "LastModified": now - timedelta(seconds=5)})
    listing.append({"Key": "audio/d.wav", "ETag": '"d"', "Size": 3, "LastModified": now + timedelta(hours=1)})
    bounded = Watcher(FakeS3(), "whisper-batch", "audio/", tmp_path / "w.json", deliver, settle=0.5, batch_window=0.3)
    assert bounded.poll() == 0
    time.sleep(0.35)
    assert bounded.poll() == 1  # d never settles: c goes once the window has passed


def test_watcher_delivers_objects_whose_upload_completed_without_settling(tmp_path):
    """An object local mode PUT itself is whole: no settle wait for that version, while a
    fresh object nobody vouched for (a file still being copied) still waits."""
    from datetime import datetime, timezone

    from batch_job.local.watcher import Watcher

    now = datetime.now(timezone.utc)
    listing = [{"Key": "audio/a.wav", "ETag": '"a"', "Size": 3, "LastModified": now},
               {"Key": "audio/b.wav", "ETag": '"b"', "Size": 3, "LastModified": now}]

    FakeS3, events, deliver = _listing_s3(listing)

    watcher = Watcher(FakeS3(), "whisper-batch", "audio/", tmp_path / "w.json", deliver, settle=60, batch_window=0)
    watcher.uploaded({"audio/a.wav": '"stale-etag"'})
    assert watcher.poll() == 0  # another version of a.wav was vouched for, not this one
    watcher.uploaded({"audio/a.wav": '"a"'})
    assert watcher.poll() == 1 and len(events) == 1
    assert json.loads(events[0]["Records"][0]["body"])["Records"][0]["s3"]["object"]["key"] == "audio/a.wav"
    assert ("audio/a.wav", "a") not in watcher.complete  # forgotten once delivered
    assert watcher.poll() == 0  # b.wav, never vouched for, still settles


# ---------------------------------------------------------------------------- end to end
class Local:
    """A `whisper-batch local` process; its output lines are collected by a reader thread."""

    def __init__(self, data_dir: Path, env: dict[str, str], *args: str) -> None:
        self.data_dir = data_dir
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "batch_job.cli", "local", "--data-dir", str(data_dir), *args],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        banner = self.wait_line(r"S3 endpoint (http://127\.0\.0\.1:\d+)", 60)
        self.endpoint = re.search(r"(http://127\.0\.0\.1:\d+)", banner).group(1)
        self.s3 = boto3.session.Session().client(
            "s3", endpoint_url=self.endpoint, region_name=REGION,
            aws_access_key_id=ACCESS_KEY_ID, aws_secret_access_key=SECRET_ACCESS_KEY)
        self.wait_line(r"Watching for new files", 30)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_line(self, pattern: str, timeout: float) -> str:
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if regex.search(line):
                    return line
            if self.proc.poll() is not None and not self._reader.is_alive():
                break
            time.sleep(0.1)
        raise AssertionError(f"no line matching {pattern!r} within {timeout} s; output:\n{self.output()}")

    def get_json(self, key: str) -> dict | None:
        try:
            return json.loads(self.s3.get_object(Bucket=BUCKET, Key=key)["Body"].read())
        except self.s3.exceptions.NoSuchKey:
            return None

    def wait_json(self, key: str, timeout: float = JOB_TIMEOUT) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            doc = self.get_json(key)
            if doc is not None:
                return doc
            if self.proc.poll() is not None:
                break
            time.sleep(0.5)
        raise AssertionError(f"s3://{BUCKET}/{key} did not appear; output:\n{self.output()}")

    def jobs(self, input_key: str | None = None) -> list[dict]:
        """Jobs from the journal; ``keys`` = the input keys a job transcribes (its pack manifest's)."""
        db = sqlite3.connect(f"file:{self.data_dir / '.whisper-batch-local' / 'jobs.sqlite'}?mode=ro", uri=True)
        try:
            rows = db.execute("SELECT id, status, attempts, request FROM jobs ORDER BY seq").fetchall()
        finally:
            db.close()
        jobs = []
        for job_id, status, attempts, request in rows:
            uri = json.loads(request)["parameters"]["input"]
            key = uri.removeprefix(f"s3://{BUCKET}/")
            if key.endswith(".jsonl"):  # a pack: its manifest (read from disk: works while stopped)
                body = (self.data_dir / BUCKET / key).read_text(encoding="utf-8")
                keys = [json.loads(line)["input"].removeprefix(f"s3://{BUCKET}/") for line in body.splitlines() if line]
            else:
                keys = [key]
            jobs.append({"id": job_id, "status": status, "attempts": attempts, "input": uri, "keys": keys})
        return [j for j in jobs if input_key is None or input_key in j["keys"]]

    def settled_jobs(self, timeout: float = 60) -> list[dict]:
        """The journal's jobs once every one has ended (a job writes its outputs before it exits and
        is marked done, so an output in S3 does not mean its job's status is final yet)."""
        deadline = time.monotonic() + timeout
        while True:
            jobs = self.jobs()
            if all(j["status"] in ("SUCCEEDED", "FAILED") for j in jobs) or time.monotonic() > deadline:
                return jobs
            time.sleep(0.5)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 90) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise
        self._reader.join(5)
        return code


@pytest.fixture(scope="module")
def local_env(model_cache_dir) -> dict[str, str]:
    from batch_job.engine.models import resolve_checkpoint

    resolve_checkpoint("tiny.en", model_cache_dir)  # convert once, before jobs race for it
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "WHISPER_BATCH_"))}
    env.update(WHISPER_BATCH_CACHE_DIR=str(model_cache_dir), PYTHONUNBUFFERED="1")
    return env


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("local-data")


@pytest.fixture(scope="module")
def instance(data_dir, local_env):
    """``{"local": Local}``: the restart test swaps in the restarted instance."""
    holder = {"local": Local(data_dir, local_env, "--workers", "2")}
    yield holder
    holder["local"].stop()


def upload(local: Local, key: str, body: bytes) -> str:
    return local.s3.put_object(Bucket=BUCKET, Key=key, Body=body)["ETag"].strip('"')


def test_three_concurrent_uploads(instance):
    local = instance["local"]
    a, b = shared_clip(CLIP_A), shared_clip(CLIP_B)
    bad = os.urandom(64 * 1024)
    files = {"audio/jfk.flac": a.read_bytes(), f"audio/nested dir+é/{CLIP_B}": b.read_bytes(), "audio/bad.wav": bad}
    with ThreadPoolExecutor(3) as pool:
        etags = dict(zip(files, pool.map(lambda kv: upload(local, *kv), files.items()), strict=True))

    marker_a = local.wait_json("transcripts/audio/jfk.flac.json")
    marker_b = local.wait_json(f"transcripts/audio/nested dir+é/{CLIP_B}.json")
    error = local.wait_json("transcripts/audio/bad.wav.error.json")

    assert marker_a["source"]["etag"].strip('"') == etags["audio/jfk.flac"]
    assert marker_b["source"]["key"] == f"audio/nested dir+é/{CLIP_B}"
    text_a = local.s3.get_object(Bucket=BUCKET, Key="transcripts/audio/jfk.flac.txt")["Body"].read().decode()
    text_b = local.s3.get_object(Bucket=BUCKET, Key=f"transcripts/audio/nested dir+é/{CLIP_B}.txt")["Body"].read().decode()
    assert_transcript_matches(text_a, CLIP_A)
    assert_transcript_matches(text_b, CLIP_B)
    for suffix in (".srt", ".vtt"):  # every format, on disk under the data folder too
        assert (local.data_dir / BUCKET / "transcripts" / "audio" / f"jfk.flac{suffix}").stat().st_size > 0

    assert error["reason"] == "corrupt_audio" and error["retryable"] is False and error["exit_code"] == 65
    assert local.get_json("transcripts/audio/bad.wav.json") is None
    local.wait_line(r"failed\s+audio/bad\.wav\s+corrupt_audio", 30)
    local.wait_line(r"done\s+audio/jfk\.flac", 30)
    # each object in exactly one job (packed as the submitter saw fit); the permanent failure
    # was not retried, and the pack holding it reports FAILED (exit 65) while its other files are done
    for key in files:
        assert len(local.jobs(key)) == 1, local.jobs()
    (bad_job,) = local.jobs("audio/bad.wav")
    assert bad_job["attempts"] == 1 and bad_job["status"] == "FAILED"
    settled = local.settled_jobs()
    assert all(j["status"] == "SUCCEEDED" for j in settled if "audio/bad.wav" not in j["keys"]), settled


def test_duplicate_upload_creates_no_second_job(instance):
    local = instance["local"]
    if not local.jobs("audio/jfk.flac"):
        pytest.skip("needs test_three_concurrent_uploads")
    upload(local, "audio/jfk.flac", shared_clip(CLIP_A).read_bytes())  # same bytes, same key
    local.wait_line(r"duplicate\s+audio/jfk\.flac", 30)
    assert len(local.jobs("audio/jfk.flac")) == 1
    assert len([line for line in local.lines if re.search(r"queued\s+audio/jfk\.flac", line)]) == 1


def test_status_counts_a_mixed_drop_exactly(instance, local_env):
    """After good, corrupt, truncated and duplicate files: ``whisper-batch status`` against local
    mode's S3 endpoint reports the counts the markers hold, the failure grouped by reason, the
    truncated file as done with a warning, and nothing pending."""
    local = instance["local"]
    if not local.jobs("audio/bad.wav"):
        pytest.skip("needs test_three_concurrent_uploads")
    upload(local, "audio/truncated.wav", truncated_wav())
    warned = local.wait_json("transcripts/audio/truncated.wav.json")
    assert [w["code"] for w in warned["warnings"]] == ["truncated_audio"]
    local.settled_jobs()
    env = dict(local_env, AWS_ACCESS_KEY_ID=ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY=SECRET_ACCESS_KEY,
               AWS_DEFAULT_REGION=REGION)
    out = subprocess.run([sys.executable, "-m", "batch_job.cli", "status", f"s3://{BUCKET}/transcripts/",
                          "--input", f"s3://{BUCKET}/audio/", "--endpoint-url", local.endpoint, "--json"],
                         capture_output=True, text=True, env=env, timeout=120, check=True)
    report = json.loads(out.stdout)
    assert (report["done"], report["failed"], report["warned"], report["pending"]) == (3, 1, 1, 0), report
    assert report["failures"] == {"corrupt_audio": {"count": 1, "examples": ["audio/bad.wav"]}}
    seconds = 0.0
    for key in ("audio/jfk.flac", f"audio/nested dir+é/{CLIP_B}", "audio/truncated.wav"):
        seconds += local.get_json(f"transcripts/{key}.json")["duration"]
    assert report["audio_hours"] == pytest.approx(seconds / 3600, abs=2e-4)


def test_file_copied_into_data_folder(instance):
    local = instance["local"]
    target = local.data_dir / BUCKET / "audio" / "dropped" / CLIP_B
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(shared_clip(CLIP_B).read_bytes())
    local.wait_json(f"transcripts/audio/dropped/{CLIP_B}.json")
    text = (local.data_dir / BUCKET / "transcripts" / "audio" / "dropped" / f"{CLIP_B}.txt").read_text()
    assert_transcript_matches(text, CLIP_B)


def test_stop_and_restart_runs_queued_jobs(instance, data_dir, local_env):
    """Also: files dropped while local mode is stopped arrive in one delivery at the next start and
    run as packs spread over the workers, each file reported on its own."""
    instance["local"].stop()
    # one worker: the first upload runs (and is interrupted), the second is still queued
    local = instance["local"] = Local(data_dir, local_env, "--workers", "1")
    upload(local, "audio/restart/first.flac", shared_clip(CLIP_B).read_bytes())
    local.wait_line(r"queued\s+audio/restart/first\.flac", 30)
    upload(local, "audio/restart/second.flac", shared_clip(CLIP_A).read_bytes())
    local.wait_line(r"running\s+audio/restart/first\.flac", 30)
    local.wait_line(r"queued\s+audio/restart/second\.flac", 30)
    assert local.stop(signal.SIGINT) == 0  # Ctrl-C: clean stop, exit 0
    local.wait_line(r"requeued\s+audio/restart/first\.flac", 5)
    local.wait_line(r"2 job\(s\) queued for the next start", 5)
    assert {j["status"] for j in local.jobs() if "/restart/" in j["input"]} == {"RUNNABLE"}
    assert not (data_dir / BUCKET / "transcripts" / "audio" / "restart" / "first.flac.json").exists()
    dropped = [f"audio/packed/{n}-{CLIP_A}" for n in range(4)]
    for key in dropped:
        (data_dir / BUCKET / key).parent.mkdir(parents=True, exist_ok=True)
        (data_dir / BUCKET / key).write_bytes(shared_clip(CLIP_A).read_bytes())

    local = instance["local"] = Local(data_dir, local_env, "--workers", "2")
    local.wait_line(r"resumed .*2 job\(s\) queued", 10)
    first = local.wait_json("transcripts/audio/restart/first.flac.json")
    second = local.wait_json("transcripts/audio/restart/second.flac.json")
    assert first["source"]["key"] == "audio/restart/first.flac" and second["source"]["key"] == "audio/restart/second.flac"
    text = local.s3.get_object(Bucket=BUCKET, Key="transcripts/audio/restart/first.flac.txt")["Body"].read().decode()
    assert_transcript_matches(text, CLIP_B)
    local.wait_line(r"done\s+audio/restart/first\.flac", 60)  # the process exits just after its marker
    local.wait_line(r"done\s+audio/restart/second\.flac", 60)
    # the four dropped files: two packs of two (one per worker), every file reported done
    markers = [local.wait_json(f"transcripts/{key}.json") for key in dropped]
    packs = [j for j in local.jobs() if set(j["keys"]) & set(dropped)]
    assert sorted(len(j["keys"]) for j in packs) == [2, 2], packs
    assert all(m["pack"]["objects"] == 2 for m in markers)
    for key in dropped:
        local.wait_line(rf"done\s+{re.escape(key)}", 60)
    # nothing delivered before the restart is submitted again
    assert len(local.jobs("audio/jfk.flac")) == 1
    assert {j["status"] for j in local.jobs() if "/restart/" in j["input"]} == {"SUCCEEDED"}


def test_once_prints_transcript(tmp_path, local_env):
    bad = tmp_path / "bad.wav"
    bad.write_bytes(os.urandom(32 * 1024))
    proc = subprocess.run(
        [sys.executable, "-m", "batch_job.cli", "local", "--data-dir", str(tmp_path / "data"),
         "--once", str(shared_clip(CLIP_A)), str(bad)],
        cwd=REPO, env=local_env, capture_output=True, text=True, timeout=JOB_TIMEOUT,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr  # bad.wav failed
    head, _, rest = proc.stdout.partition(f"==> {shared_clip(CLIP_A)}")
    assert rest, proc.stdout + proc.stderr
    transcript = rest.split("==>")[0]
    assert_transcript_matches(transcript, CLIP_A)
    assert "bad.wav  FAILED (failed): corrupt_audio" in proc.stdout
    assert (tmp_path / "data" / BUCKET / "transcripts" / "audio" / "jfk.flac.srt").exists()

    # again on the same folder: the completion marker holds this ETag, so the job is skipped
    # (no model load) and the transcript is printed from the stored outputs; exit 0
    again = subprocess.run(
        [sys.executable, "-m", "batch_job.cli", "local", "--data-dir", str(tmp_path / "data"),
         "--once", str(shared_clip(CLIP_A))],
        cwd=REPO, env=local_env, capture_output=True, text=True, timeout=JOB_TIMEOUT,
    )
    assert again.returncode == 0, again.stdout + again.stderr
    assert_transcript_matches(again.stdout, CLIP_A)
