"""SIGTERM mid-decode, end to end: `whisper-batch run-job` in a subprocess against moto_server."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

boto3 = pytest.importorskip("boto3")

from conftest import shared_clip  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def moto_endpoint():
    exe = shutil.which("moto_server") or str(Path(sys.executable).with_name("moto_server"))
    if not Path(exe).exists():
        pytest.skip("moto_server not installed")
    port = _free_port()
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            time.sleep(0.1)
    else:
        proc.kill()
        pytest.skip("moto_server did not start")
    yield url
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture
def env(moto_endpoint, tmp_path):
    e = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "WHISPER_BATCH_"))}
    e.update(AWS_ENDPOINT_URL=moto_endpoint, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
             AWS_DEFAULT_REGION="us-east-1", AWS_BATCH_JOB_ATTEMPT="1", AWS_BATCH_JOB_ID="sigterm-job",
             WHISPER_BATCH_WORK_DIR=str(tmp_path / "work"), PYTHONPATH=str(REPO))
    return e


SLOW_JOB = textwrap.dedent("""\
    import sys, time
    from batch_job import cli
    from batch_job.job import pack
    from batch_job.result import FileResult

    class Slow:
        model_name = "slow-stand-in"
        def transcribe(self, audio, *, language=None, task="transcribe", progress=False, on_window=None):
            for i in range(1200):            # 2 minutes of "decoding" unless interrupted
                time.sleep(0.1)
                on_window(i + 1, 1200)
            raise AssertionError("SIGTERM did not interrupt the decode")
        def transcribe_many(self, inputs, *, language=None, task="transcribe", on_window=None):
            for name, audio in inputs:
                yield FileResult(name, self.transcribe(audio, on_window=on_window), None)

    pack.load_transcriber = lambda settings: Slow()
    sys.exit(cli.main(sys.argv[1:]))
    """)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_mid_decode_leaves_no_outputs_and_exits_75(env, tmp_path, sig):
    s3 = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                      aws_access_key_id="testing", aws_secret_access_key="testing")
    bucket = f"sig-{sig.value}-{os.getpid()}"
    s3.create_bucket(Bucket=bucket)
    key = "spot reclaim/clip +1.flac"
    s3.put_object(Bucket=bucket, Key=key, Body=shared_clip("ljspeech_LJ001-0002.flac").read_bytes())
    script = tmp_path / "slow_job.py"
    script.write_text(SLOW_JOB)

    proc = subprocess.Popen([sys.executable, str(script), "run-job", "--input", f"s3://{bucket}/{key}",
                             "--output", f"s3://{bucket}/out/"], env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[dict] = []
    decoding = threading.Event()

    def read_stderr():
        for line in proc.stderr:
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            lines.append(entry)
            if entry.get("stage") == "first_window":
                decoding.set()

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    try:
        assert decoding.wait(120), f"job never started decoding: {lines}"
        proc.send_signal(sig)
        rc = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    reader.join(timeout=10)

    assert rc == 75, lines
    keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", []))
    assert keys == sorted([key, f"out/{key}.error.json"])  # input + error marker, no partial outputs
    err = json.loads(s3.get_object(Bucket=bucket, Key=f"out/{key}.error.json")["Body"].read())
    assert err["reason"] == "interrupted" and err["retryable"] is True and err["exit_code"] == 75
    assert err["attempt"] == 1 and err["source"]["key"] == key
    failed = [entry for entry in lines if entry.get("stage") == "failed"]
    assert failed and failed[0]["reason"] == "interrupted" and failed[0]["job_id"] == "sigterm-job"
    assert list((tmp_path / "work").iterdir()) == []  # temp files removed
    emf = [json.loads(line) for line in proc.stdout.read().splitlines() if line.startswith("{")]
    assert emf and emf[-1]["JobsFailed"] == 1 and emf[-1]["Reason"] == "interrupted"


def test_run_job_help_is_registered(env):
    out = subprocess.run([sys.executable, "-m", "batch_job.cli", "run-job", "--help"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "--input" in out.stdout and "--manifest" in out.stdout
