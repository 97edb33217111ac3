"""Time ``whisper-batch status``'s marker read on N markers against a server on 127.0.0.1.

    .venv/bin/python benchmarks/status.py [--server local|moto|both] [--markers N] [--threads T ...]

``local``: local mode's S3 endpoint (``rclone serve s3``, batch_job/local/s3server.py) over a temporary
data folder, markers written straight into it as files (how local mode stores objects);
``moto``: ``moto_server``, markers seeded with PUTs. Every tenth marker is an error marker
(``corrupt_audio``), every seventh completion marker carries a warning; each timed run must
count exactly those (``counts match``), and the table says how long the read took.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

from batch_job.local import ACCESS_KEY_ID, SECRET_ACCESS_KEY, free_port
from batch_job.local.s3server import S3Server
from batch_job.status.reader import read_markers, s3_client
from batch_job.status.records import summarize

BUCKET = "status-bench"
PREFIX = "out/"
FAIL_EVERY, WARN_EVERY = 10, 7


def marker(i: int) -> tuple[str, bytes]:
    """The i-th marker's key (under PREFIX) and body."""
    if i % FAIL_EVERY == 0:
        key = f"in/{i // 1000:03d}/{i}.wav.error.json"
        body = {"reason": "corrupt_audio", "retryable": False, "exit_code": 65}
    else:
        key = f"in/{i // 1000:03d}/{i}.wav.json"
        body = {"job": {"audio_seconds": 60.0, "real_time_factor": 0.05, "cost": {"total_usd": 0.001}},
                "warnings": [{"code": "truncated_audio"}] if i % WARN_EVERY == 0 else []}
    return key, json.dumps(body).encode()


def expected(n: int) -> tuple[int, int, int]:
    failed = len(range(0, n, FAIL_EVERY))
    warned = sum(1 for i in range(n) if i % FAIL_EVERY and i % WARN_EVERY == 0)
    return n - failed, failed, warned


@contextmanager
def local_server(n: int) -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="status-bench-") as tmp:
        t0 = time.monotonic()
        for i in range(n):
            key, body = marker(i)
            path = Path(tmp, BUCKET, PREFIX, key)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(body)
        print(f"local: wrote {n} marker files in {time.monotonic() - t0:.1f} s", file=sys.stderr)
        server = S3Server(tmp, bucket=BUCKET).start()
        try:
            yield server.endpoint_url
        finally:
            server.stop()


@contextmanager
def moto(n: int) -> Iterator[str]:
    port = free_port()
    server = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "moto_server"), "-p", str(port),
                               "-H", "127.0.0.1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        client = s3_client(32, url)
        for _ in range(100):
            try:
                client.create_bucket(Bucket=BUCKET)
                break
            except Exception:
                time.sleep(0.1)
        t0 = time.monotonic()

        def put(i: int) -> None:
            key, body = marker(i)
            client.put_object(Bucket=BUCKET, Key=PREFIX + key, Body=body)
        with ThreadPoolExecutor(32) as pool:
            list(pool.map(put, range(n)))
        print(f"moto: seeded {n} markers with PUTs in {time.monotonic() - t0:.1f} s", file=sys.stderr)
        yield url
    finally:
        server.terminate()
        server.wait(10)


SERVERS: dict[str, Callable[[int], object]] = {"local": local_server, "moto": moto}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--server", choices=[*SERVERS, "both"], default="both")
    ap.add_argument("--markers", type=int, default=10_000)
    ap.add_argument("--threads", type=int, nargs="+", default=[32, 16, 8])
    args = ap.parse_args()
    for k, v in {"AWS_ACCESS_KEY_ID": ACCESS_KEY_ID, "AWS_SECRET_ACCESS_KEY": SECRET_ACCESS_KEY,
                 "AWS_DEFAULT_REGION": "us-east-1"}.items():
        os.environ.setdefault(k, v)
    n = args.markers
    want = expected(n)
    print("| server | markers | threads | seconds | done | failed | warned | counts match |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for name in (list(SERVERS) if args.server == "both" else [args.server]):
        with SERVERS[name](n) as url:  # type: ignore[attr-defined]
            for threads in args.threads:
                client = s3_client(threads, url)
                t0 = time.monotonic()
                s = summarize(read_markers(client, BUCKET, PREFIX, threads=threads))
                dt = time.monotonic() - t0
                got = (s.done, s.failed, s.warned)
                print(f"| {name} | {n} | {threads} | {dt:.1f} | {s.done} | {s.failed} | {s.warned} | "
                      f"{got == want} |", flush=True)


if __name__ == "__main__":
    main()
