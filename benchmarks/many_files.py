"""Many short files end to end: packed jobs vs one job per file vs faster-whisper, loop and batched (CPU).

The workload this product exists for is many short recordings. This measures, on N short real
English clips from ../shared/audio (``WHISPER_BATCH_SHARED_AUDIO`` overrides), in one run, with
the same weights and the same number of CPU threads in total:

* ``packed``: ``whisper-batch local`` (in a child process: the embedded S3 endpoint, the real
  submitter handler, LocalBatch running ``run-job`` processes), default packing, ``--workers W``;
  wall time from the first upload to the last file's completion marker (what a user waits);
* ``per-file``: the same with ``--pack-max-objects 1``: one Batch job per file, as before packs;
* ``fw``: one faster-whisper process (``WhisperModel(ct2_dir, compute_type="int8",
  cpu_threads=T)``, ``transcribe(path, beam_size=1)``, files one after another): the simplest
  script a user would write instead; wall time of the whole process, imports and model load
  included;
* ``fw-batched``: the same process with faster-whisper's strongest mode, ``BatchedInferencePipeline``
  (its default batch size 8 and Silero VAD, ``beam_size=1`` like every other system here: all
  decode greedily), files one after another.

Throughput = audio seconds / wall seconds. WER pools every file (Whisper's English normalizer,
jiwer), as benchmarks/throughput.py does. Local-mode start-up (servers, powertools import) is
reported apart: it happens once per ``whisper-batch local`` session, not per batch of files.

    python benchmarks/many_files.py                          # 40 clips of 4-20 s, all systems
    python benchmarks/many_files.py --limit 10 --systems packed,fw   # smoke run
    python benchmarks/many_files.py --write-docs             # also update docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from corpus import SHARED_AUDIO, ct2_dir_for, error_rates, machine_info, read_manifest  # noqa: E402
from docs_section import write_section  # noqa: E402
from throughput import run_child  # noqa: E402

SECTION = "## Many short files end to end (packs)"
SYSTEMS = ("packed", "per-file", "fw", "fw-batched")
LABELS = {
    "packed": "whisper-batch local, packs (default)",
    "per-file": "whisper-batch local, one job per file (--pack-max-objects 1)",
    "fw": "one faster-whisper process, files in a loop",
    "fw-batched": "one faster-whisper process, BatchedInferencePipeline",
}
FW_SYSTEMS = ("fw", "fw-batched")


# ============================================================================ child side
def child_local(spec: dict) -> dict:
    """One ``whisper-batch local`` session: start, upload every clip, wait for every marker."""
    import threading

    from batch_job.local.cli import LocalMode

    out = open(spec["log"], "w", encoding="utf-8")  # the per-file progress lines
    t_start = time.monotonic()
    mode = LocalMode(spec["data_dir"], workers=spec["workers"], pack_max_objects=spec["pack_max_objects"],
                     poll_interval=0.5, settle=0.5, out=out)
    mode.start()
    try:
        startup = time.monotonic() - t_start
        t0, t0_wall = time.monotonic(), time.time()
        uploads = mode.upload([Path(p) for p in spec["paths"]])
        uploaded = time.monotonic() - t0
        results = mode.wait_for(uploads, threading.Event())
        wall = time.monotonic() - t0
        jobs = mode.executor.list_jobs()
        hyps = {}
        for key, (path, _etag) in uploads.items():
            status, _detail = results.get(key, ("missing", None))
            text = ""
            if status == "succeeded":
                body = mode.s3.get_object(Bucket=mode.bucket, Key=f"{mode.output_prefix}{key}.txt")["Body"]
                text = body.read().decode("utf-8")
            hyps[str(path)] = {"hyp": text.strip(), "status": status}
    finally:
        mode.stop()
        out.close()
    return {"wall": wall, "startup": startup, "jobs": len(jobs), "files": hyps,
            "stages": job_stages(spec["data_dir"], t0_wall, uploaded, wall)}


def job_stages(data_dir: str, t0_wall: float, uploaded: float, wall: float) -> dict[str, float]:
    """Where a local-mode run's wall time went, from the jobs' JSON log lines (seconds after the
    first upload): uploads done, first job process started, model ready (slowest job), last job
    done, last marker seen."""
    from datetime import datetime

    from batch_job.local import state_dir

    starts, ready, done = [], [], []
    for log in sorted((state_dir(Path(data_dir)) / "logs" / "jobs").glob("*.log")):
        for line in log.read_text(encoding="utf-8").splitlines():
            if not line.startswith('{"ts"'):
                continue
            rec = json.loads(line)
            at = datetime.fromisoformat(rec["ts"]).timestamp() - t0_wall
            if rec.get("stage") == "manifest":
                starts.append(at - float(rec["elapsed_s"]))
            elif rec.get("stage") == "model_ready":
                ready.append(at)
            elif rec.get("stage") == "pack_done":
                done.append(at)
    return {"uploaded": uploaded, "job_started": min(starts, default=0.0), "model_ready": max(ready, default=0.0),
            "jobs_done": max(done, default=0.0), "seen_done": wall}


def child_fw(spec: dict) -> dict:
    """The loop a user would write with faster-whisper (the process's whole life is timed by the parent)."""
    from faster_whisper import BatchedInferencePipeline, WhisperModel

    model = WhisperModel(spec["ct2_dir"], device="cpu", compute_type="int8", cpu_threads=spec["threads"])
    pipe = BatchedInferencePipeline(model=model) if spec["system"] == "fw-batched" else model
    hyps = {}
    for path in spec["paths"]:
        segments, _info = pipe.transcribe(path, beam_size=1)
        hyps[path] = {"hyp": "".join(s.text for s in segments).strip(), "status": "succeeded"}
    return {"files": hyps, "jobs": 1}


def child_main(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    result = child_fw(spec) if spec["system"] in FW_SYSTEMS else child_local(spec)
    Path(spec["out"]).write_text(json.dumps(result), encoding="utf-8")
    return 0


# ============================================================================ parent side
def select_clips(limit: int, min_seconds: float, max_seconds: float) -> list[dict]:
    rows = [r for r in read_manifest(SHARED_AUDIO)
            if r["language"] == "en" and min_seconds <= float(r["seconds"]) < max_seconds]
    return rows[:limit]


def run_system(system: str, clips: list[dict], args: argparse.Namespace, env: dict[str, str], tmp: Path) -> dict:
    spec = {"system": system, "set": "files", "paths": [c["path"] for c in clips],
            "log": str(tmp / f"{system}.progress.log"), "data_dir": str(tmp / f"{system}-data"),
            "workers": args.workers, "threads": args.threads,
            "pack_max_objects": 1 if system == "per-file" else None, "ct2_dir": args.ct2_dir}
    t0 = time.monotonic()
    result = run_child(spec, env, tmp, script=__file__)
    process_wall = time.monotonic() - t0
    if "error" in result:
        return result
    result["system"] = system
    if system in FW_SYSTEMS:
        result["wall"] = process_wall
    rows = [{**c, "hyp": result["files"][c["path"]]["hyp"]} for c in clips]
    result["wer"] = error_rates(rows, multilingual=False).get("en", {}).get("rate")
    result["failed"] = sum(1 for f in result["files"].values() if f["status"] != "succeeded")
    return result


def median_round(runs: list[dict]) -> dict:
    """A system's round with the median wall time (the first error, if any round failed)."""
    failed = [r for r in runs if "error" in r]
    if failed:
        return failed[0]
    return sorted(runs, key=lambda r: r["wall"])[len(runs) // 2]


def render(results: list[dict], clips: list[dict], args: argparse.Namespace, meta: dict) -> str:
    audio = sum(float(c["seconds"]) for c in clips)
    by = {r["system"]: r for r in results if "error" not in r}
    fw = by.get("fw")
    fw_batched = by.get("fw-batched")
    per_file = by.get("per-file")
    lines = [
        "| system | files | audio s | jobs | wall s (first upload → last marker) | audio-s / wall-s | "
        "× one job per file | × faster-whisper loop | × faster-whisper batched | WER | failed |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def ratio(peer: dict | None, r: dict) -> str:
        return f"{peer['wall'] / r['wall']:.2f}" if peer else "-"

    for r in results:
        if "error" in r:
            lines.append(f"| {LABELS[r['system']]} | error: {r['error'][:200]} ||||||||||")
            continue
        rate = audio / r["wall"]
        wer = "-" if r.get("wer") is None else f"{100 * r['wer']:.1f}%"
        lines.append(f"| {LABELS[r['system']]} | {len(clips)} | {audio:.1f} | {r['jobs']} | {r['wall']:.1f} | "
                     f"{rate:.1f} | {ratio(per_file, r)} | {ratio(fw, r)} | {ratio(fw_batched, r)} | {wer} | "
                     f"{r['failed']} |")
    startups = [f"{r['system']} {r['startup']:.1f} s" for r in results if "startup" in r]
    stages = [f"{r['system']}: uploads done {st['uploaded']:.1f} s, first job started {st['job_started']:.1f} s, "
              f"model ready in every job {st['model_ready']:.1f} s, last job done {st['jobs_done']:.1f} s, last "
              f"marker seen {st['seen_done']:.1f} s" for r in results if (st := r.get("stages"))]
    packed = by.get("packed")
    targets = []
    if packed:
        def status(ok: bool) -> str:
            return "met" if ok else "**not met**"

        targets = ["", "| target | this run | status |", "|---|---|---|"]
        if per_file:
            x_file = per_file["wall"] / packed["wall"]
            targets.append(f"| packed >= 4x the throughput of one job per file (#11) | {x_file:.2f}x | "
                           f"{status(x_file >= 4.0)} |")
        for peer, floor in ((fw, 1.5), (fw_batched, 1.2)):
            if not peer:
                continue
            x = peer["wall"] / packed["wall"]
            wer_ok = packed["wer"] is not None and peer["wer"] is not None and packed["wer"] <= peer["wer"] + 0.005
            targets += [
                f"| packed >= {floor}x {LABELS[peer['system']]} (#23) | {x:.2f}x | {status(x >= floor)} |",
                f"| packed WER <= {peer['system']}'s + 0.5 pt (#23) | {100 * (packed['wer'] or 0):.1f}% vs "
                f"{100 * (peer['wer'] or 0):.1f}% | {status(wer_ok)} |",
            ]
        if len(targets) == 3:
            targets = []
    command = "python benchmarks/many_files.py " + " ".join(shlex.quote(a) for a in meta["argv"])
    notes = [
        "",
        f"Command: `{command.strip()}`. Measured {meta['when']} on {meta['machine']['nproc']} usable cores "
        f"({meta['machine']['cpu_model']}; load average {meta['machine']['loadavg_start'][0]:.1f} at start), "
        f"python {meta['machine']['python']}, torch {meta['machine']['torch']}, "
        f"faster-whisper {meta['machine']['faster-whisper']}, ctranslate2 {meta['machine']['ctranslate2']}.",
        f"- {len(clips)} English clips of {args.min_seconds:g}-{args.max_seconds:g} s from `../shared/audio`, "
        f"model `tiny.en` (the same packaged weights for all: faster-whisper reads the CTranslate2 files, "
        f"ours their conversion), {args.threads} CPU threads in total for every system "
        f"(local mode: {args.workers} worker(s) × {max(1, args.threads // args.workers)} thread(s) per job).",
        f"- {args.rounds} round(s), the systems interleaved in each; every row is that system's median round "
        "(wall s of every round: " + "; ".join(f"{k} " + " / ".join(f"{w:.1f}" for w in v)
                                             for k, v in meta.get("walls", {}).items()) + ").",
        "- Local mode wall time starts at the first upload and ends when the last completion marker is "
        "read (upload, watcher poll, submitter, Batch stand-in, job start, model load and transcription "
        "all inside it); local-mode start-up, once per session, is apart: " + (", ".join(startups) or "-") + ".",
        "- Where local mode's wall time went (seconds after the first upload, from the jobs' log lines): "
        + ("; ".join(stages) or "-") + ".",
        "- faster-whisper: the wall time of its whole process (interpreter, imports, model load, the loop); "
        "batched: `BatchedInferencePipeline(model).transcribe(path, beam_size=1)` (its default batch size 8 "
        "and VAD), `int8`, the same threads.",
        "- Where the difference comes from: a job per file pays process start, imports and the model load "
        "for every file (see 'Job overhead' above); a pack pays them once and batches the windows of its "
        "files together; local mode spreads a burst over its workers (PACK_PARALLELISM = workers, one "
        "per 2 cores by default: one bigger pack shares more encoder rows, see 'Where the time goes' below). On CPU the "
        "encoder is most of the compute on short clips and runs in bfloat16 where the CPU has native bf16 "
        "(docs/engine.md); short files of different names share encoder rows (batch_job/shared_rows.py). "
        "The CPU graph cache is warm before timing (traced once per image).",
    ]
    return "\n".join(lines + targets + notes) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        return child_main(argv[1])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--limit", type=int, default=40, help="clips (default %(default)s)")
    p.add_argument("--min-seconds", type=float, default=4.0)
    p.add_argument("--max-seconds", type=float, default=20.0)
    p.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated subset of " + ",".join(SYSTEMS))
    p.add_argument("--rounds", type=int, default=1,
                   help="run every system this many times, interleaved; report each one's median (default 1)")
    p.add_argument("--workers", type=int, default=None,
                   help="local mode's workers (default: its own default, one per 2 cores of --threads)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads in total per system (default %(default)s)")
    p.add_argument("--cache-dir", default=os.environ.get("WHISPER_BATCH_TEST_CACHE") or None,
                   help="model cache (default $WHISPER_BATCH_TEST_CACHE, else the settings' default)")
    p.add_argument("--ct2-dir", default=None, help="faster-whisper model directory (default: the packaged tiny.en)")
    p.add_argument("--write-docs", action="store_true", help=f"replace '{SECTION}' in docs/benchmarks.md")
    p.add_argument("--keep", metavar="DIR", help="keep the data folders and job logs in DIR (default: a temp dir)")
    args = p.parse_args(argv)
    systems = [s for s in args.systems.split(",") if s]
    unknown = set(systems) - set(SYSTEMS)
    if unknown:
        p.error(f"unknown systems {sorted(unknown)}")
    if args.rounds < 1:
        p.error("--rounds must be at least 1")

    from batch_job.engine.models import resolve_checkpoint
    from batch_job.local.executor import CORES_PER_JOB
    from batch_job.settings import Settings

    if args.workers is None:  # local mode's default, on the threads this run gives every system
        args.workers = max(1, args.threads // CORES_PER_JOB)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "WHISPER_BATCH_"))}
    env.update(WHISPER_BATCH_MODEL="tiny.en", WHISPER_BATCH_THREADS=str(max(1, args.threads // args.workers)),
               OMP_NUM_THREADS=str(args.threads), PYTHONUNBUFFERED="1")
    if args.cache_dir:
        env["WHISPER_BATCH_CACHE_DIR"] = args.cache_dir
    cache_dir = Path(args.cache_dir or Settings.from_env().cache_dir)
    hf_dir = resolve_checkpoint("tiny.en", str(cache_dir))  # converted once, before any job
    from batch_job.engine.loading import load_engine

    # The CPU graph cache traced once, before timing: a first job would otherwise trace the graphs
    # (seconds, once per image/cache) and every other job starting at once would do the same.
    load_engine(Settings.from_env({}, model="tiny.en", cache_dir=str(cache_dir)))
    args.ct2_dir = str(ct2_dir_for("tiny.en", Path(hf_dir), cache_dir, args.ct2_dir))

    clips = select_clips(args.limit, args.min_seconds, args.max_seconds)
    if not clips:
        p.error(f"no English clips of {args.min_seconds}-{args.max_seconds} s in {SHARED_AUDIO}")
    meta = {"argv": argv, "machine": machine_info(),
            "when": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    rounds: dict[str, list[dict]] = {system: [] for system in systems}
    with tempfile.TemporaryDirectory(prefix="many-files-") as scratch:
        for k in range(args.rounds):  # systems interleaved: a slow spell of the machine hits all of them
            tmp = Path(args.keep or scratch) / f"round-{k + 1}"
            tmp.mkdir(parents=True, exist_ok=True)
            for system in systems:
                print(f"round {k + 1}: running {system} on {len(clips)} clips ...", file=sys.stderr, flush=True)
                r = run_system(system, clips, args, env, tmp)
                rounds[system].append(r)
                print(f"  {system}: " + (r["error"] if "error" in r else f"{r['wall']:.1f} s, {r['jobs']} job(s)"),
                      file=sys.stderr, flush=True)
    results = [median_round(runs) for runs in rounds.values()]
    meta["walls"] = {system: [r["wall"] for r in runs if "error" not in r] for system, runs in rounds.items()}
    table = render(results, clips, args, meta)
    print(table)
    if args.write_docs:
        write_section(SECTION, table)
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
