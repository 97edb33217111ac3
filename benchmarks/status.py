"""Time ``whisper-batch status``'s marker read on N markers against a moto_server on 127.0.0.1.

    .venv/bin/python benchmarks/status.py [N] [THREADS...]
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from batch_job.status.reader import read_markers, s3_client
from batch_job.status.records import summarize


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 10_000
    thread_counts = [int(t) for t in sys.argv[2:]] or [32]
    for k, v in {"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        os.environ.setdefault(k, v)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "moto_server"), "-p", str(port),
                               "-H", "127.0.0.1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        client = s3_client(32, url)
        for _ in range(100):
            try:
                client.create_bucket(Bucket="status-bench")
                break
            except Exception:
                time.sleep(0.1)
        fail_every, warn_every = 10, 7

        def put(i: int) -> None:
            if i % fail_every == 0:
                key, body = f"out/in/{i}.wav.error.json", {"reason": "corrupt_audio", "retryable": False}
            else:
                key = f"out/in/{i}.wav.json"
                body = {"job": {"audio_seconds": 60.0, "real_time_factor": 0.05, "cost": {"total_usd": 0.001}},
                        "warnings": [{"code": "w"}] if i % warn_every == 0 else []}
            client.put_object(Bucket="status-bench", Key=key, Body=json.dumps(body))
        t0 = time.monotonic()
        with ThreadPoolExecutor(32) as pool:
            list(pool.map(put, range(n)))
        print(f"seeded {n} markers in {time.monotonic() - t0:.1f} s")
        expect_failed = len(range(0, n, fail_every))
        expect_warned = sum(1 for i in range(n) if i % fail_every and i % warn_every == 0)
        print("| markers | threads | seconds | done | failed | warned | counts match |")
        print("|---|---|---|---|---|---|---|")
        for threads in thread_counts:
            c = s3_client(threads, url)
            t0 = time.monotonic()
            s = summarize(read_markers(c, "status-bench", "out/", threads=threads))
            dt = time.monotonic() - t0
            ok = (s.done, s.failed, s.warned) == (n - expect_failed, expect_failed, expect_warned)
            print(f"| {n} | {threads} | {dt:.1f} | {s.done} | {s.failed} | {s.warned} | {ok} |")
    finally:
        server.terminate()
        server.wait(10)


if __name__ == "__main__":
    main()
