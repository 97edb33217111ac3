"""Local mode: the whole pipeline on one machine, no AWS account (``whisper-batch local``).

The pieces are the deployed ones, wired to loopback stand-ins (see docs/local.md):

* S3        -> ``rclone serve s3`` over ``--data-dir`` (:mod:`batch_job.local.s3server`);
               a folder is a bucket, an object is a file;
* DynamoDB  -> ``moto_server`` on loopback, idempotency table as the stack creates it
               (:mod:`batch_job.local.dynamo`);
* S3 -> SQS -> Lambda -> the watcher lists the input prefix and calls the SAME
               ``submitter.app.handler`` with SQS-wrapped S3 notifications
               (:mod:`batch_job.local.watcher`);
* AWS Batch -> a ``submit_job(**kwargs)`` stand-in that runs each job as a
               ``whisper-batch run-job`` process with the job definition's retry rules
               (:mod:`batch_job.local.executor`).

Local state (job journal, watcher memory, logs) lives in ``DATA_DIR/.whisper-batch-local/``,
hidden from the S3 endpoint.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

DEFAULT_BUCKET = "whisper-batch"
DEFAULT_INPUT_PREFIX = "audio/"
DEFAULT_OUTPUT_PREFIX = "transcripts/"
DEFAULT_DATA_DIR = "./local-data"
#: Folder of local-mode state inside the data dir (excluded from the S3 endpoint).
STATE_DIRNAME = ".whisper-batch-local"
#: Credentials of the embedded endpoints (loopback only; printed for the user).
ACCESS_KEY_ID = "whisperbatchlocal"
SECRET_ACCESS_KEY = "whisperbatchlocalsecret"
REGION = "us-east-1"
LOOPBACK = "127.0.0.1"


def die_with_parent() -> None:
    """``preexec_fn`` for child processes: SIGTERM when local mode dies without stopping them
    (Linux ``PR_SET_PDEATHSIG``; elsewhere a no-op), so no server or job outlives a kill -9."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - not Linux/glibc: best effort
        pass


def state_dir(data_dir: str | Path) -> Path:
    path = Path(data_dir) / STATE_DIRNAME
    path.mkdir(parents=True, exist_ok=True)
    return path


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port that is free right now on ``host`` (the caller binds it soon after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_open(host: str, port: int, timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_for_port(host: str, port: int, timeout: float, alive=lambda: True) -> bool:
    """Wait until something accepts connections on ``host:port``; ``alive()`` False aborts."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if port_open(host, port):
            return True
        if not alive():
            return False
        time.sleep(0.05)
    return False
