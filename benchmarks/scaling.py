"""Cost grows linearly: 10, 40 and 160 files and one 1-hour file, per stage (CPU).

On the English clips of ../shared/audio (``WHISPER_BATCH_SHARED_AUDIO`` overrides), cycled in
manifest order where a set needs more files than there are clips, and on one file of about an
hour made by joining the clips (1 s of silence between, repeated until it reaches
``--hour-seconds``; cached as 16 kHz FLAC under ``<cache>/bench-audio/``), measures for every set,
each in its own process:

* ``ours``: ``Transcriber.transcribe_many`` with ``Settings.for_batch_job`` (what ``run-job`` runs:
  shared encoder rows on), int8 decoder, the engine's per-stage timings summed over the files
  (``decode_audio``, ``segment``, ``features`` (log-mel), ``encode``, ``decode``; the rest of the wall
  time is the stream's own bookkeeping and the transcripts);
* ``fw-batched``: faster-whisper ``BatchedInferencePipeline`` (int8, its default batch size and
  Silero VAD, ``beam_size=1``), files one after another: the peer on the same sets.

Wall time excludes the model load and a one-clip warm-up; peak RSS is the process's
``ru_maxrss`` (load included). "Linear" is read from the cost per audio second: a stage whose
seconds per audio hour grow with the set's size is superlinear.

    python benchmarks/scaling.py                          # 10, 40, 160 files and the 1-hour file, both systems
    python benchmarks/scaling.py --sizes 10 --no-hour --systems ours   # smoke run
    python benchmarks/scaling.py --write-docs             # also update docs/benchmarks.md
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
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from corpus import LONG_GAP_SECONDS, REPO, SHARED_AUDIO, build_long_file, ct2_dir_for, error_rates, machine_info, read_manifest  # noqa: E402
from docs_section import write_section  # noqa: E402
from throughput import run_child  # noqa: E402

SECTION = "## Scaling: 10, 40, 160 files and a 1-hour file (issue #23)"
SYSTEMS = ("ours", "fw-batched")
LABELS = {"ours": "ours (run-job settings)", "fw-batched": "faster-whisper BatchedInferencePipeline"}
STAGES = ("decode_audio", "segment", "features", "encode", "decode")


# ============================================================================ child side
def child_main(spec_path: str) -> int:
    import resource

    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    sys.path.insert(0, str(REPO))
    t0 = time.perf_counter()
    if spec["system"] == "ours":
        from batch_job.settings import Settings
        from batch_job.transcribe import Transcriber

        tr = Transcriber.load(Settings.for_batch_job(model="tiny.en", cache_dir=spec["cache_dir"], device="cpu",
                                                     threads=spec["threads"]))

        def run(paths: list[str]) -> tuple[list[str], dict[str, float]]:
            texts: dict[str, str] = {}
            stages: dict[str, float] = {}
            for r in tr.transcribe_many([(f"{i:05d}", p) for i, p in enumerate(paths)]):
                texts[r.name] = "" if r.error is not None else r.transcript.text
                for k, v in (r.transcript.timings if r.error is None else {}).items():
                    stages[k] = stages.get(k, 0.0) + v
            return [texts[f"{i:05d}"] for i in range(len(paths))], stages
    else:
        from faster_whisper import BatchedInferencePipeline, WhisperModel

        model = WhisperModel(spec["ct2_dir"], device="cpu", compute_type="int8", cpu_threads=spec["threads"])
        pipe = BatchedInferencePipeline(model=model)

        def run(paths: list[str]) -> tuple[list[str], dict[str, float]]:
            out = []
            for p in paths:
                segments, _info = pipe.transcribe(p, beam_size=1)
                out.append("".join(s.text for s in segments).strip())
            return out, {}
    load_s = time.perf_counter() - t0
    run([spec["warmup"]])
    t0 = time.perf_counter()
    texts, stages = run(spec["paths"])
    wall = time.perf_counter() - t0
    result = {"load_s": load_s, "wall_s": wall, "texts": texts, "stages": stages,
              "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}
    Path(spec["out"]).write_text(json.dumps(result), encoding="utf-8")
    return 0


# ============================================================================ parent side
def build_hour_file(clips: list[dict], cache_dir: Path, seconds: float) -> dict:
    """The clips cycled until ``seconds``, joined by throughput's :func:`build_long_file` (1 s of
    silence between, one cached 16 kHz FLAC); its manifest row, with the number of clips."""
    cycled: list[dict] = []
    total = 0.0
    while total < seconds:
        c = clips[len(cycled) % len(clips)]
        total += float(c["seconds"]) + (LONG_GAP_SECONDS if cycled else 0.0)
        cycled.append(c)
    return {**build_long_file(cycled, cache_dir), "clips": len(cycled)}


def render(results: list[dict], meta: dict) -> str:
    head = ("| system | set | files | audio s | wall s | audio-s / wall-s | wall s per audio hour | "
            "ours ÷ fw-batched | peak RSS MB | WER | " + " | ".join(f"{s} s/h" for s in STAGES) + " | other s/h |")
    lines = [head, "|" + "|".join(["---"] * 2 + ["---:"] * (head.count("|") - 3)) + "|"]
    fw = {r["set"]: r for r in results if r["system"] == "fw-batched" and "error" not in r}
    for r in results:
        if "error" in r:
            lines.append(f"| {LABELS[r['system']]} | {r['set']} | FAILED: {r['error'][-160:].replace('|', '/')} |")
            continue
        per_hour = 3600.0 / r["audio_s"]
        peer = fw.get(r["set"]) if r["system"] == "ours" else None
        cells = [LABELS[r["system"]], r["set"], str(r["files"]), f"{r['audio_s']:.0f}", f"{r['wall_s']:.1f}",
                 f"{r['audio_s'] / r['wall_s']:.1f}", f"{r['wall_s'] * per_hour:.0f}",
                 f"{peer['wall_s'] / r['wall_s']:.2f}" if peer else "-", f"{r['peak_rss_mb']:.0f}",
                 "-" if r.get("wer") is None else f"{100 * r['wer']:.1f}%"]
        if r["stages"]:
            known = sum(r["stages"].get(s, 0.0) for s in STAGES)
            cells += [f"{r['stages'].get(s, 0.0) * per_hour:.0f}" for s in STAGES]
            cells.append(f"{max(0.0, r['wall_s'] - known) * per_hour:.0f}")
        else:
            cells += ["-"] * (len(STAGES) + 1)
        lines.append("| " + " | ".join(cells) + " |")
    m = meta["machine"]
    notes = [
        "",
        f"Command: `{meta['command']}`. Measured {meta['when']} on {m['nproc']} usable cores ({m['cpu_model']}; "
        f"load average {m['loadavg_start'][0]:.1f} at start, {m['loadavg_end'][0]:.1f} at end), "
        f"python {m['python']}, torch {m['torch']}, ctranslate2 {m['ctranslate2']}, "
        f"faster-whisper {m['faster-whisper']}; model tiny.en, {meta['threads']} threads for both, the same weights.",
        f"- N files: the first N of the {meta['clips']} English clips of `../shared/audio` in manifest order, "
        "cycled where N is larger (160 files hold each clip twice or three times); hour: "
        f"{meta.get('hour_clips', 0)} clips joined with {LONG_GAP_SECONDS:g} s of silence "
        f"({meta.get('hour_seconds', 0):.0f} s, one 16 kHz FLAC).",
        "- Wall time excludes the model load and a one-clip warm-up; each (system, set) in its own process; "
        "peak RSS = that process's `ru_maxrss`, model included. `s/h` columns: seconds of that stage per hour "
        "of audio (the engine's own timings summed over the files; `other` = wall minus the stages: the "
        "stream's bookkeeping, segments to text, transcripts). Linear cost = flat `s/h` down a column.",
    ]
    return "\n".join(lines + notes) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        return child_main(argv[1])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="10,40,160", help="file counts (default %(default)s)")
    p.add_argument("--no-hour", action="store_true", help="skip the 1-hour file")
    p.add_argument("--hour-seconds", type=float, default=3600.0)
    p.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated subset of " + ",".join(SYSTEMS))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cache-dir", default=os.environ.get("WHISPER_BATCH_TEST_CACHE") or None)
    p.add_argument("--ct2-dir", default=None)
    p.add_argument("--json", metavar="OUT")
    p.add_argument("--write-docs", action="store_true", help=f"replace '{SECTION}' in docs/benchmarks.md")
    args = p.parse_args(argv)
    systems = [s for s in args.systems.split(",") if s]
    if set(systems) - set(SYSTEMS):
        p.error(f"unknown systems {sorted(set(systems) - set(SYSTEMS))}")
    sys.path.insert(0, str(REPO))
    from batch_job.engine.models import resolve_checkpoint
    from batch_job.settings import Settings

    cache_dir = Path(args.cache_dir or Settings().cache_dir).expanduser()
    hf_dir = resolve_checkpoint("tiny.en", str(cache_dir))
    ct2_dir = str(ct2_dir_for("tiny.en", Path(hf_dir), cache_dir, args.ct2_dir)) if "fw-batched" in systems else None
    clips = [r for r in read_manifest(SHARED_AUDIO) if r["language"] == "en"]
    if not clips:
        print(f"skipped: no English clips in {SHARED_AUDIO}")
        return 0
    sets: dict[str, list[dict]] = {}
    for n in (int(x) for x in args.sizes.split(",") if x):
        sets[f"{n} files"] = [clips[i % len(clips)] for i in range(n)]
    meta: dict[str, Any] = {"clips": len(clips), "threads": args.threads, "machine": machine_info(),
                            "when": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                            "command": "python benchmarks/scaling.py " + " ".join(shlex.quote(a) for a in argv)}
    if not args.no_hour:
        hour = build_hour_file(clips, cache_dir, args.hour_seconds)
        sets["1-hour file"] = [hour]
        meta.update(hour_clips=hour["clips"], hour_seconds=hour["seconds"])
    warmup = min(clips[:10], key=lambda r: abs(float(r["seconds"]) - 5.0))["path"]
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(args.threads)
    env.update(TOKENIZERS_PARALLELISM="false", PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])))
    results = []
    with tempfile.TemporaryDirectory(prefix="scaling-") as tmp:
        for set_name, rows in sets.items():
            for system in systems:
                audio_s = sum(float(r["seconds"]) for r in rows)
                print(f"running {system} on {set_name} ({audio_s:.0f} s) ...", file=sys.stderr, flush=True)
                spec = {"system": system, "set": set_name, "paths": [r["path"] for r in rows], "warmup": warmup,
                        "cache_dir": str(cache_dir), "ct2_dir": ct2_dir, "threads": args.threads}
                res = run_child(spec, env, Path(tmp), script=__file__)
                res.update(system=system, set=set_name, files=len(rows), audio_s=audio_s)
                if "error" not in res:
                    scored = [{**r, "hyp": h} for r, h in zip(rows, res.pop("texts"))]
                    res["wer"] = error_rates(scored, multilingual=False).get("en", {}).get("rate")
                    print(f"  wall {res['wall_s']:.1f} s, {audio_s / res['wall_s']:.1f} audio-s/s, "
                          f"peak RSS {res['peak_rss_mb']:.0f} MB", file=sys.stderr, flush=True)
                else:
                    print(f"  {res['error']}", file=sys.stderr, flush=True)
                results.append(res)
    meta["machine"]["loadavg_end"] = list(os.getloadavg())
    table = render(results, meta)
    print(table)
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n", encoding="utf-8")
    if args.write_docs:
        write_section(SECTION, table)
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
