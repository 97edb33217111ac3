"""Job overhead of `whisper-batch run-job`: process start -> model ready, and -> first window decoded.

Each run is a fresh `python -m batch_job.cli run-job` process against a local moto_server S3
(the same code path as on AWS Batch: HEAD, marker check, download, audio decode, model load,
decode, uploads). Times come from the job's own stage log lines, whose ``elapsed_s`` is measured
from the process's creation time (/proc: `batch_job.job.process_start_time`, accurate to a clock
tick), so interpreter start-up and imports are included.

    python benchmarks/job_overhead.py                 # tiny.en on CPU, jfk.flac, 5 runs (+1 warm-up)
    python benchmarks/job_overhead.py --runs 9 --model tiny.en --clip jfk.flac --json out.json

Columns (seconds since the process was created): ``job_start_s`` first log line (interpreter,
imports, settings), ``audio_ready_s`` after HEAD + marker check + download + audio decode,
``model_load_s`` the model load alone, ``model_ready_s``, ``first_window_s`` first decoded batch,
``done_s`` outputs uploaded; ``wall_s`` as seen by the parent.

Target: model ready in under 2 s (median).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from corpus import REPO, SHARED_AUDIO  # noqa: E402

TARGET_MODEL_READY_S = 2.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_moto() -> tuple[subprocess.Popen, str]:
    exe = shutil.which("moto_server") or str(Path(sys.executable).with_name("moto_server"))
    port = _free_port()
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return proc, f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("moto_server did not start")


def one_run(env: dict[str, str], input_uri: str, output_uri: str) -> dict[str, float | None]:
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "batch_job.cli", "run-job", "--input", input_uri,
                           "--output", output_uri], env=env, capture_output=True, text=True, cwd=REPO)
    wall = time.monotonic() - t0
    stages: dict[str, dict] = {}
    for line in proc.stderr.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and "stage" in entry:
            stages.setdefault(entry["stage"], entry)
    if proc.returncode != 0:
        raise SystemExit(f"run-job exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return {
        "job_start_s": stages.get("start", {}).get("elapsed_s"),
        "audio_ready_s": stages.get("audio", {}).get("elapsed_s"),
        "model_ready_s": stages.get("model_ready", {}).get("elapsed_s"),
        "first_window_s": stages.get("first_window", {}).get("elapsed_s"),
        "model_load_s": stages.get("model_ready", {}).get("model_load_seconds"),
        "done_s": stages.get("done", {}).get("elapsed_s"),
        "wall_s": round(wall, 3),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1, help="uncounted runs first (model conversion cache, page cache)")
    ap.add_argument("--model", default="tiny.en")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--clip", default="jfk.flac", help="file in ../shared/audio")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)

    import boto3

    clip = SHARED_AUDIO / args.clip
    moto, endpoint = start_moto()
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "WHISPER_BATCH_"))}
        env.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                   AWS_DEFAULT_REGION="us-east-1", WHISPER_BATCH_MODEL=args.model,
                   WHISPER_BATCH_DEVICE=args.device, WHISPER_BATCH_METRICS_MODE="off",
                   PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""))
        if os.environ.get("WHISPER_BATCH_CACHE_DIR"):
            env["WHISPER_BATCH_CACHE_DIR"] = os.environ["WHISPER_BATCH_CACHE_DIR"]
        s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                          aws_access_key_id="bench", aws_secret_access_key="bench")
        s3.create_bucket(Bucket="bench")
        s3.put_object(Bucket="bench", Key=f"in/{clip.name}", Body=clip.read_bytes())
        rows = []
        for i in range(args.warmup + args.runs):
            # a fresh output prefix per run, so the idempotency check never skips the work
            row = one_run(env, f"s3://bench/in/{clip.name}", f"s3://bench/out-{i}/")
            if i >= args.warmup:
                rows.append(row)
    finally:
        moto.terminate()
        moto.wait(timeout=10)

    cols = ["job_start_s", "audio_ready_s", "model_load_s", "model_ready_s", "first_window_s", "done_s", "wall_s"]
    median = {c: round(statistics.median(r[c] for r in rows if r[c] is not None), 3) for c in cols}
    load = ", load average {:.1f}/{:.1f}/{:.1f}".format(*os.getloadavg()) if hasattr(os, "getloadavg") else ""
    print(f"job overhead: {args.model} on {args.device}, clip {args.clip}, {args.runs} runs "
          f"({platform.processor() or platform.machine()}, {os.cpu_count()} CPUs{load})")
    print("| run | " + " | ".join(cols) + " |")
    print("|---|" + "---|" * len(cols))
    for i, r in enumerate(rows, 1):
        print(f"| {i} | " + " | ".join(f"{r[c]:.3f}" if r[c] is not None else "-" for c in cols) + " |")
    print("| **median** | " + " | ".join(f"**{median[c]:.3f}**" for c in cols) + " |")
    ok = median["model_ready_s"] < TARGET_MODEL_READY_S
    print(f"model ready median {median['model_ready_s']:.3f} s: target < {TARGET_MODEL_READY_S} s "
          f"{'MET' if ok else 'MISSED'}")
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": rows, "median": median, "model": args.model,
                                               "device": args.device, "clip": args.clip}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
