"""Engine throughput and accuracy against faster-whisper and the transformers pipeline (CPU).

On the real speech in ../shared/audio (``WHISPER_BATCH_SHARED_AUDIO`` overrides) plus one long
file made by concatenating the English clips (written once as 16 kHz FLAC into the cache dir),
measures in one run, with the same weights, the same audio and the same thread count:

* ``ours``: :class:`batch_job.transcribe.Transcriber` with default settings (CPU, int8 decoder),
  ``transcribe_many`` over all files, so windows are batched ACROSS files (a design advantage);
* ``ours-shared``: the same with ``Settings.for_batch_job`` (what ``run-job`` runs: short windows
  of different files share one encoder row, ``share_rows``);
* ``ours-words``: the same with ``word_timestamps=True`` (the cost of word timing: alignment-head
  attention recorded per step, then median filter + DTW per segment);
* ``fw``: faster-whisper ``WhisperModel(ct2_dir, device="cpu", compute_type="int8")``,
  ``transcribe(path, beam_size=1)``, every other option at faster-whisper's default, one file
  after another (its API is per file);
* ``fw-batched``: faster-whisper ``BatchedInferencePipeline`` (its default Silero VAD on),
  ``transcribe(path, batch_size=B, beam_size=1)``, one file after another (batches within a file);
* ``hf``: ``transformers.pipeline("automatic-speech-recognition", model=<our converted checkpoint>,
  chunk_length_s=30, batch_size=B)``, fp32, ``return_timestamps=True``, called once with the
  list of all files (the pipeline batches chunks across files).

Each (system, set) runs in its own subprocess: import + model load is timed apart from
transcription, and peak RSS (``ru_maxrss``) is that process's own. Throughput = audio seconds /
transcription wall seconds (audio decoding included, model load and a one-clip warm-up excluded).
WER pools errors over the whole set (jiwer on lists), Whisper's English normalizer on both sides;
multilingual models also get WER with the basic normalizer for other languages and CER for ja/zh.

    python benchmarks/throughput.py                              # tiny.en, all systems, clips + long file
    python benchmarks/throughput.py --model base --threads 2 --json /tmp/base.json
    python benchmarks/throughput.py --limit 5 --no-long          # smoke run
    python benchmarks/throughput.py --write-docs                 # also update docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from corpus import (  # noqa: E402
    LONG_GAP_SECONDS,
    REPO,
    SAMPLE_RATE,
    SHARED_AUDIO,
    build_long_file,
    build_odd_corpus,
    ct2_dir_for,
    error_rates,
    machine_info,
    read_manifest,
)

DOCS = REPO / "docs" / "benchmarks.md"
SECTION = "## Throughput and accuracy (engine)"
SYSTEMS = ("ours", "ours-shared", "ours-words", "fw", "fw-batched", "hf")
SYSTEM_LABELS = {
    "ours": "ours (Transcriber, int8 decoder)",
    "ours-shared": "ours, shared encoder rows (run-job's default)",
    "ours-words": "ours, --word-timestamps",
    "fw": "faster-whisper int8, sequential",
    "fw-batched": "faster-whisper int8, BatchedInferencePipeline",
    "hf": "transformers pipeline fp32",
}


# ============================================================================ child side
# Runs in a fresh interpreter per (system, set); imports only what that system needs.


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def _current_rss_mb() -> float:
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2**20
    except Exception:  # pragma: no cover
        return float("nan")


def _load_ours(spec: dict, word_timestamps: bool, batch_job: bool = False) -> Any:
    from batch_job.settings import Settings
    from batch_job.transcribe import Transcriber

    # from_env: WHISPER_BATCH_* knobs (e.g. WHISPER_BATCH_QUANTIZE_DECODER=0) can be compared;
    # for_batch_job: what run-job runs (shared encoder rows on unless WHISPER_BATCH_SHARE_ROWS says no).
    settings = (Settings.for_batch_job if batch_job else Settings.from_env)(
        model=spec["model"],
        cache_dir=spec["cache_dir"],
        device="cpu",
        batch_size=spec["batch_size"],
        threads=spec["threads"],
        word_timestamps=word_timestamps,
    )
    tr = Transcriber.load(settings)

    def run(items: list[dict]) -> list[dict]:
        by_name = {}
        for r in tr.transcribe_many([(it["name"], it["path"]) for it in items]):
            if r.error is not None:
                by_name[r.name] = {"hyp": "", "detected": None, "error": f"{type(r.error).__name__}: {r.error}"}
            else:
                words = sum(len(seg.words) for seg in r.transcript.segments)
                by_name[r.name] = {"hyp": r.transcript.text, "detected": r.transcript.language,
                                   "timings": r.transcript.timings,  # features/encode/decode shares
                                   "words": words}
        return [by_name[it["name"]] for it in items]

    return run


def _load_fw(spec: dict, batched: bool) -> Any:
    from faster_whisper import BatchedInferencePipeline, WhisperModel

    model = WhisperModel(spec["ct2_dir"], device="cpu", compute_type="int8", cpu_threads=spec["threads"])
    pipe = BatchedInferencePipeline(model=model) if batched else None

    def run(items: list[dict]) -> list[dict]:
        out = []
        for it in items:
            if pipe is not None:
                segments, info = pipe.transcribe(it["path"], batch_size=spec["batch_size"], beam_size=1)
            else:
                segments, info = model.transcribe(it["path"], beam_size=1)
            text = "".join(s.text for s in segments).strip()  # the generator does the work
            out.append({"hyp": text, "detected": info.language})
        return out

    return run


def _load_hf(spec: dict) -> Any:
    import torch
    from transformers import pipeline
    from transformers.utils import logging as hf_logging

    from batch_job.audio import load_audio

    hf_logging.set_verbosity_error()
    torch.set_num_threads(spec["threads"])
    pipe = pipeline(
        "automatic-speech-recognition",
        model=spec["hf_dir"],
        dtype=torch.float32,
        device="cpu",
        chunk_length_s=30,
        batch_size=spec["batch_size"],
    )
    multilingual = spec["multilingual"]

    def run(items: list[dict]) -> list[dict]:
        # No ffmpeg needed: decode with the product's loader (inside the timed region).
        inputs = [{"raw": load_audio(it["path"]), "sampling_rate": SAMPLE_RATE} for it in items]
        kwargs: dict[str, Any] = {"return_timestamps": True}
        if multilingual:
            # return_language=True breaks batched chunk pipelines (IndexError in loader_batch_item,
            # transformers 5.23): the detected language is not recorded for hf.
            kwargs["generate_kwargs"] = {"task": "transcribe"}
        with torch.inference_mode():
            results = pipe(inputs, **kwargs)
        out = []
        for r in results:
            langs = [c.get("language") for c in r.get("chunks") or [] if c.get("language")]
            out.append({"hyp": r["text"].strip(), "detected": max(set(langs), key=langs.count) if langs else None})
        return out

    return run


def child_main(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    system = spec["system"]
    sys.path.insert(0, str(REPO))
    t0 = time.perf_counter()
    if system in ("ours", "ours-shared", "ours-words"):
        run = _load_ours(spec, word_timestamps=system == "ours-words", batch_job=system == "ours-shared")
    elif system in ("fw", "fw-batched"):
        run = _load_fw(spec, batched=system == "fw-batched")
    elif system == "hf":
        run = _load_hf(spec)
    else:
        raise SystemExit(f"unknown system {system!r}")
    load_s = time.perf_counter() - t0
    rss_loaded = _current_rss_mb()
    warmup_s = None
    if spec.get("warmup"):
        t0 = time.perf_counter()
        run([spec["warmup"]])
        warmup_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    outputs = run(spec["items"])
    wall_s = time.perf_counter() - t0
    result = {
        "system": system,
        "load_s": load_s,
        "warmup_s": warmup_s,
        "wall_s": wall_s,
        "rss_after_load_mb": rss_loaded,
        "peak_rss_mb": _peak_rss_mb(),
        "outputs": outputs,
    }
    Path(spec["out"]).write_text(json.dumps(result), encoding="utf-8")
    return 0


# ============================================================================ parent side


def run_child(spec: dict, env: dict[str, str], tmp: Path, script: str = __file__) -> dict:
    """Run ``script --child SPEC`` (one system on one set, in its own process) and return what it
    wrote to ``spec["out"]``, or ``{"system", "error"}`` with the tail of its output."""
    spec_path = tmp / f"{spec['system']}-{spec['set']}.spec.json"
    spec["out"] = str(tmp / f"{spec['system']}-{spec['set']}.out.json")
    spec_path.write_text(json.dumps(spec), encoding="utf-8")
    proc = subprocess.run(
        [sys.executable, str(Path(script).resolve()), "--child", str(spec_path)],
        env=env,
        cwd=str(REPO),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    if proc.returncode != 0 or not Path(spec["out"]).is_file():
        tail = proc.stdout.strip().splitlines()[-15:]
        return {"system": spec["system"], "error": f"exit {proc.returncode}: " + " | ".join(tail)}
    return json.loads(Path(spec["out"]).read_text(encoding="utf-8"))


def run_set(spec: dict, rows: list[dict], env: dict[str, str], tmp: Path, multilingual: bool) -> dict:
    """One system on one set in its own process: its result with per-file hypotheses, throughput and WER."""
    audio_s = sum(r["seconds"] for r in rows)
    res = run_child(spec, env, tmp)
    res.update({"set": spec["set"], "files": len(rows), "audio_s": audio_s})
    if "error" in res:
        print(f"  FAILED: {res['error']}", flush=True)
        return res
    res["per_file"] = [{"audio": r["audio"], "language": r["language"], "seconds": r["seconds"], "text": r["text"], **o}
                       for r, o in zip(rows, res.pop("outputs"))]
    res["throughput"] = audio_s / res["wall_s"] if res["wall_s"] > 0 else float("inf")
    res["error_rates"] = error_rates(res["per_file"], multilingual)
    print(f"  load {res['load_s']:.2f} s, wall {res['wall_s']:.2f} s, "
          f"{res['throughput']:.1f} audio-s/s, peak RSS {res['peak_rss_mb']:.0f} MB", flush=True)
    return res


def median_run(runs: list[dict]) -> dict:
    """The round with the median wall time (the first failure, if any round failed), with every
    round's wall time as ``round_walls`` (in the order they ran)."""
    failed = [r for r in runs if "error" in r]
    if failed:
        return failed[0]
    return {**sorted(runs, key=lambda r: r["wall_s"])[len(runs) // 2], "round_walls": [r["wall_s"] for r in runs]}


def fmt(v: float | None, digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def render_table(results: list[dict], multilingual: bool) -> str:
    cols = ["system", "set", "files", "audio s", "load s", "wall s", "audio-s / wall-s", "ours ÷ system", "WER en"]
    if multilingual:
        cols += ["WER other (basic norm.)", "CER ja/zh"]
    cols += ["peak RSS MB"]
    rounds = any(len(r.get("round_walls", ())) > 1 for r in results)
    if rounds:
        cols += ["wall s of each round"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(cols) - 2)) + "|"]
    ours = {r["set"]: r for r in results if r["system"] == "ours" and "error" not in r}
    for r in results:
        head = [SYSTEM_LABELS[r["system"]], r["set"], str(r["files"]), fmt(r["audio_s"], 1)]
        if "error" in r:
            last = r["error"].split(" | ")[-1].replace("|", "/")[:160]
            lines.append("| " + " | ".join(head + [f"FAILED: {last}"] + [""] * (len(cols) - 5)) + " |")
            continue
        base = ours.get(r["set"])
        ratio = base["throughput"] / r["throughput"] if base else None
        er = r["error_rates"]

        def cell(key: str, er: dict = er) -> str:
            if key not in er:
                return "-"
            return f"{100 * er[key]['rate']:.1f}% ({er[key]['files']})"

        row = head + [fmt(r["load_s"]), fmt(r["wall_s"]), fmt(r["throughput"], 1), fmt(ratio), cell("en")]
        if multilingual:
            row += [cell("other"), cell("cjk")]
        row += [fmt(r["peak_rss_mb"], 0)]
        if rounds:
            row += [" / ".join(fmt(w, 1) for w in r["round_walls"])]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def render_notes(meta: dict) -> str:
    a = meta["args"]
    notes = [
        f"- Model `{a['model']}` ({'multilingual' if meta['multilingual'] else 'English-only'}): "
        f"the same weights everywhere (faster-whisper reads the packaged CTranslate2 `model.bin`; "
        f"ours and transformers read its conversion `{Path(meta['hf_dir']).name}`). "
        f"{a['threads']} threads for every system (torch.set_num_threads / ctranslate2 cpu_threads, "
        f"OMP/MKL_NUM_THREADS), batch size {a['batch_size']}.",
    ]
    if "clips" in meta["sets"]:
        notes.append(
            f"- clips: {meta['sets']['clips']['files']} files, {meta['sets']['clips']['seconds']:.1f} s"
            + (f" (first {a['limit']} eligible)" if a["limit"] else "")
            + (f"; {meta['skipped_non_english']} non-English clips skipped (English-only model)" if meta["skipped_non_english"] else "")
            + ".")
    if "long" in meta["sets"]:
        notes.append(
            f"- long: one {meta['sets']['long']['seconds']:.1f} s FLAC of the "
            f"{meta['sets']['long']['clips']} English clips joined with {LONG_GAP_SECONDS:g} s of silence "
            "(English only: faster-whisper detects the language once per file, so a mixed-language "
            "file would measure language-detection policy, not throughput)."
        )
    if "odd" in meta["sets"]:
        odd = meta["sets"]["odd"]
        notes.append(
            f"- odd: the same {odd['files']} English clips ({odd['seconds']:.1f} s), each re-encoded from its 16 kHz "
            "decode into one format in turn (soundfile/libsndfile, no ffmpeg here; cached under "
            "`<cache>/bench-audio/odd-*`): "
            + ", ".join(f"{name} {n}" for name, n in odd["formats"].items())
            + " (8 kHz 8-bit unsigned WAV; 6-channel 48 kHz WAV with the speech in C and quieter in L/R/surround; "
            "44.1 kHz 24-bit stereo FLAC; 22.05 kHz mono MP3; 32 kHz stereo Ogg Vorbis). Every system decodes "
            "them itself (ours: soundfile, block by block, down-mix and resample; faster-whisper: PyAV), "
            "inside the timed region."
        )
    notes += [
        "- audio-s / wall-s: audio seconds / transcription wall seconds, audio decoding included; "
        "model load (imports + weights, `load s`) and a one-clip warm-up excluded. Each system and set "
        "runs in its own process; peak RSS is that process's `ru_maxrss` (load included)."
        + (f" {a['rounds']} rounds, in each every set ran by every system in turn; each row is that system's "
           "median round on the set (its WER and RSS too), the last column every round's wall time."
           if a.get("rounds", 1) > 1 else ""),
        "- ours: `Transcriber.transcribe_many` over all files of the set: windows are batched ACROSS "
        "files (a design advantage of the engine, used on purpose). Greedy, timestamps, temperature "
        "fallback, no conditioning on previous text.",
        "- ours, shared encoder rows: the same with `Settings.for_batch_job` (run-job's settings: "
        "`share_rows` on, short windows of different files share one 30 s encoder row, text dealt back by "
        "timestamp); its `ours ÷ system` below 1.00 is the gain.",
        "- ours, --word-timestamps: the same with `word_timestamps=True` (step graphs also return the "
        "alignment heads' attention; median filter + DTW per segment). Its `ours ÷ system` is the cost of "
        "word timing: 1.15 would be 15% slower"
        + "".join(f"; {n} words on {name}" for name, n in meta.get("words", {}).items())
        + ".",
        "- fw: `WhisperModel(compute_type=\"int8\").transcribe(path, beam_size=1)`, every other option at "
        "its default (temperature fallback, condition_on_previous_text=True, timestamps on, no VAD); "
        "files one by one, as its API works.",
        "- fw-batched: `BatchedInferencePipeline.transcribe(path, batch_size=B, beam_size=1)` with its "
        "defaults (Silero VAD on, without_timestamps=True); batches windows within a file, files one by one.",
        "- hf: `pipeline(\"automatic-speech-recognition\", chunk_length_s=30, batch_size=B)`, fp32, "
        "`return_timestamps=True` (the model emits timestamp tokens as ours and fw do, and chunks are "
        "merged on them), one call with the list of all files (chunks batched across files); "
        "audio decoded with `batch_job.audio.load_audio`.",
        "- WER pooled over the set (total errors / total reference words), Whisper's English normalizer "
        "on both sides"
        + ("; other languages: basic normalizer, WER; ja/zh: CER with spaces removed" if meta["multilingual"] else "")
        + ". Parentheses: files scored. Languages auto-detected by every system.",
    ]
    return "\n".join(notes)


def write_docs(section: str, heading: str = SECTION) -> None:
    text = DOCS.read_text(encoding="utf-8") if DOCS.exists() else "# Benchmarks\n"
    # Up to the next heading of level 2 or 3: the hand-written analysis under "###" is kept.
    pattern = re.compile(rf"^{re.escape(heading)}\n.*?(?=^##?# |\Z)", re.S | re.M)
    block = section.rstrip() + "\n\n"
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text, count=1)
    else:
        text = text.rstrip() + "\n\n" + block
    DOCS.parent.mkdir(parents=True, exist_ok=True)
    DOCS.write_text(text.rstrip() + "\n", encoding="utf-8")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from batch_job.settings import usable_cores

    cores = usable_cores()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny.en", help="tiny.en (default) or base (or a checkpoint dir with --ct2-dir)")
    p.add_argument("--threads", type=int, default=cores, help=f"threads for every system (default: available cores, {cores})")
    p.add_argument("--batch-size", type=int, default=8, help="batch size for ours, fw-batched and hf (default 8)")
    p.add_argument("--limit", type=int, default=0, help="first N eligible clips only (smoke runs)")
    p.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma-separated subset of {','.join(SYSTEMS)}")
    p.add_argument("--no-clips", action="store_true", help="skip the clips set (the long file and odd formats are still built from them)")
    p.add_argument("--no-long", action="store_true", help="skip the long concatenated file")
    p.add_argument("--no-odd", action="store_true",
                   help="skip the odd-formats corpus (the clips as 8 kHz u8 WAV, 6-channel 48 kHz WAV, "
                        "stereo FLAC, MP3, stereo Ogg Vorbis)")
    p.add_argument("--docs-section", default=SECTION,
                   help="heading --write-docs replaces (default %(default)r; a subset of systems can go to its own)")
    p.add_argument("--rounds", type=int, default=1,
                   help="run every (set, system) this many times, systems interleaved; the table shows each one's median round")
    p.add_argument("--no-warmup", action="store_true", help="no one-clip warm-up before timing")
    p.add_argument("--json", metavar="OUT", help="write raw results (with per-file hypotheses) here")
    p.add_argument("--write-docs", action="store_true", help="replace/insert --docs-section in docs/benchmarks.md")
    p.add_argument("--cache-dir", help="converted checkpoints, joined CT2 dir, long FLAC (default: Settings().cache_dir)")
    p.add_argument("--ct2-dir", help="CTranslate2 model dir for faster-whisper (default: from the packaged model)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    bad = [s for s in systems if s not in SYSTEMS]
    if bad or not systems:
        p.error(f"--systems: unknown {bad}; choose from {','.join(SYSTEMS)}")
    args.system_list = [s for s in SYSTEMS if s in systems]  # ours first: ratios need it
    if args.threads < 1 or args.batch_size < 1 or args.limit < 0 or args.rounds < 1:
        p.error("--threads, --batch-size and --rounds must be >= 1, --limit >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        return child_main(args.child)
    if not (SHARED_AUDIO / "manifest.jsonl").is_file():
        print(f"skipped: shared audio not available ({SHARED_AUDIO / 'manifest.jsonl'})")
        return 0
    sys.path.insert(0, str(REPO))
    from batch_job.engine.models import resolve_checkpoint
    from batch_job.settings import Settings

    started = _dt.datetime.now(_dt.timezone.utc)
    machine = machine_info()
    cache_dir = Path(args.cache_dir or Settings().cache_dir).expanduser()
    cache_dir.mkdir(parents=True, exist_ok=True)
    print(f"preparing {args.model} (conversion runs once) ...", flush=True)
    hf_dir = resolve_checkpoint(args.model, cache_dir)  # converted here, so no child pays for it
    config = json.loads((hf_dir / "config.json").read_text(encoding="utf-8"))
    multilingual = int(config.get("vocab_size", 0)) >= 51865
    needs_ct2 = any(s in ("fw", "fw-batched") for s in args.system_list)
    ct2_dir = ct2_dir_for(args.model, hf_dir, cache_dir, args.ct2_dir) if needs_ct2 else None

    manifest = read_manifest(SHARED_AUDIO)
    eligible = manifest if multilingual else [r for r in manifest if r["language"] == "en"]
    skipped = len(manifest) - len(eligible)
    if args.limit:
        eligible = eligible[: args.limit]
    if not eligible:
        print("skipped: no eligible clips")
        return 0
    sets: dict[str, list[dict]] = {"clips": eligible}
    meta_sets: dict[str, dict] = {"clips": {"files": len(eligible), "seconds": sum(r["seconds"] for r in eligible)}}
    if not args.no_long:
        english = [r for r in eligible if r["language"] == "en"]
        if english:
            print(f"building the long file from {len(english)} English clips (cached) ...", flush=True)
            long_row = build_long_file(english, cache_dir)
            sets["long"] = [long_row]
            meta_sets["long"] = {"files": 1, "seconds": long_row["seconds"], "clips": len(english), "path": long_row["path"]}
    if not args.no_odd:
        english = [r for r in eligible if r["language"] == "en"]
        if english:
            print(f"building the odd-formats corpus from {len(english)} English clips (cached) ...", flush=True)
            odd_rows = build_odd_corpus(english, cache_dir)
            sets["odd"] = odd_rows
            counts: dict[str, int] = {}
            for r in odd_rows:
                counts[r["format"]] = counts.get(r["format"], 0) + 1
            meta_sets["odd"] = {"files": len(odd_rows), "seconds": sum(r["seconds"] for r in odd_rows),
                                "formats": counts}
    if args.no_clips:
        del sets["clips"], meta_sets["clips"]
    warm_clip = min(eligible[: max(1, min(len(eligible), 10))], key=lambda r: abs(r["seconds"] - 5.0))
    warmup = None if args.no_warmup else {"name": "warmup", "path": warm_clip["path"]}

    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
        env[var] = str(args.threads)
    env["TOKENIZERS_PARALLELISM"] = "false"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))

    runs: dict[tuple[str, str], list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="throughput-") as tmpname:
        tmp = Path(tmpname)
        # Rounds outside, systems inside: a slow spell of this shared machine hits every system of
        # a set alike, and the median round of each is what the table shows.
        for k in range(args.rounds):
            for set_name, rows in sets.items():
                for system in args.system_list:
                    items = [{"name": f"{i:04d}-{r['audio']}", "path": r["path"]} for i, r in enumerate(rows)]
                    spec = {
                        "system": system,
                        "set": set_name,
                        "model": args.model,
                        "cache_dir": str(cache_dir),
                        "hf_dir": str(hf_dir),
                        "ct2_dir": str(ct2_dir) if ct2_dir else None,
                        "multilingual": multilingual,
                        "threads": args.threads,
                        "batch_size": args.batch_size,
                        "items": items,
                        "warmup": warmup,
                    }
                    label = f" (round {k + 1}/{args.rounds})" if args.rounds > 1 else ""
                    print(f"running {system} on {set_name}{label} ...", flush=True)
                    res = run_set(spec, rows, env, tmp, multilingual)
                    runs.setdefault((system, set_name), []).append(res)
    results = [median_run(runs[(system, set_name)]) for system in args.system_list for set_name in sets]

    machine["loadavg_end"] = list(os.getloadavg())
    command = "python benchmarks/throughput.py" + "".join(
        " " + shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)
    )
    words = {r["set"]: sum(f.get("words", 0) for f in r.get("per_file", []))
             for r in results if r["system"] == "ours-words"}
    meta = {
        "words": words,
        "date": started.strftime("%Y-%m-%d %H:%M UTC"),
        "command": command,
        "machine": machine,
        "args": {k: v for k, v in vars(args).items() if k not in ("child", "system_list")} | {"systems": args.system_list},
        "hf_dir": str(hf_dir),
        "ct2_dir": str(ct2_dir) if ct2_dir else None,
        "multilingual": multilingual,
        "skipped_non_english": skipped,
        "sets": meta_sets,
    }
    table = render_table(results, multilingual)
    notes = render_notes(meta)
    print()
    print(table)
    print()
    print(notes)
    odd = []
    for r in results:
        for f in r.get("per_file", []):
            if not f["hyp"].strip():
                odd.append(f"{r['system']}/{r['set']}: empty output for {f['audio']}")
            if f.get("error"):
                odd.append(f"{r['system']}/{r['set']}: error for {f['audio']}: {f['error']}")
    if odd:
        print("\nEmpty outputs / errors:\n" + "\n".join("- " + o for o in odd))
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "results": results}, indent=1, ensure_ascii=False) + "\n",
                                   encoding="utf-8")
        print(f"\nraw results: {args.json}")
    if args.write_docs:
        m = machine
        section = "\n".join([
            args.docs_section,
            "",
            f"Our engine against faster-whisper and the transformers pipeline on the real speech in "
            f"`../shared/audio`, CPU, model `{args.model}`. Measured {meta['date']} on {m['nproc']} usable cores "
            f"({m['cpu_model']}; load average {m['loadavg_start'][0]:.1f} at start, {m['loadavg_end'][0]:.1f} at end), "
            f"python {m['python']}, torch {m['torch']}, ctranslate2 {m['ctranslate2']}, "
            f"faster-whisper {m['faster-whisper']}, transformers {m['transformers']}:",
            "",
            "```",
            ". .venv/bin/activate && " + command,
            "```",
            "",
            table,
            "",
            notes,
        ])
        write_docs(section, args.docs_section)
        print(f"updated {DOCS.relative_to(REPO)}")
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
