"""Temperature fallbacks one after another vs at once, and the per-row token budget (CPU, one process).

A window that fails Whisper's guards (compression ratio > 2.4 or average log-probability < -1)
is decoded again at higher temperatures. One after another, each retry is a batch of its own
that waits for the last; at once (``Guards.fallback_at_once``), the temperatures left share one
batch and the window's audio is encoded once. A repetition loop runs to the token cap unless its
row stops at its token budget (``Engine.token_budgets``, ``decoding.token_budget``). This runs
the three settings over the clips, the 11-minute file and the odd-formats corpus of
benchmarks/throughput.py, interleaved for ``--rounds`` rounds in one process (one model load,
run-job's settings: shared encoder rows), and prints per setting and set: engine batches,
encoder rows, fallback rows, the median wall time and WER.

    python benchmarks/fallbacks.py --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from corpus import SHARED_AUDIO, build_long_file, build_odd_corpus, error_rates, read_manifest  # noqa: E402

MODES = {  # name -> (Guards.fallback_at_once, None: its default; Engine.token_budgets)
    "one after another, no budget": (1, False),
    "at once, no budget": (None, False),
    "at once + token budget (default)": (None, True),
}


def run_once(transcriber, rows: list[dict]) -> dict:
    """Transcribe ``rows`` (manifest rows) as one call; count what the engine ran."""
    counts = {"batches": 0, "encoder_rows": 0, "fallback_rows": 0}
    original = transcriber.engine.decode

    def counting(audio, options, *, temperatures=None):
        counts["batches"] += 1
        counts["encoder_rows"] += len({id(a) for a in audio})
        counts["fallback_rows"] += sum(1 for t in temperatures or () if t > 0)
        return original(audio, options, temperatures=temperatures)

    transcriber.engine.decode = counting
    try:
        t0 = time.perf_counter()
        hyp = {r.name: r.transcript.text if r.transcript else "" for r in
               transcriber.transcribe_many([(row["path"], row["path"]) for row in rows])}
        wall = time.perf_counter() - t0
    finally:
        transcriber.engine.decode = original
    scored = [{**row, "hyp": hyp[row["path"]]} for row in rows]
    return {**counts, "wall": wall, "wer": error_rates(scored, multilingual=False)["en"]["rate"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cache-dir", default=None, help="model and benchmark-audio cache (default: the settings' default)")
    args = p.parse_args(argv)
    if not (SHARED_AUDIO / "manifest.jsonl").is_file():
        print(f"skipped: shared audio not available ({SHARED_AUDIO / 'manifest.jsonl'})")
        return 0
    import dataclasses

    import torch

    from batch_job.settings import Settings
    from batch_job.transcribe import Transcriber

    torch.set_num_threads(args.threads)
    settings = Settings.for_batch_job({}, model="tiny.en", device="cpu", batch_size=8, threads=args.threads,
                                      **({"cache_dir": args.cache_dir} if args.cache_dir else {}))
    cache = Path(settings.cache_dir).expanduser()
    english = [r for r in read_manifest(SHARED_AUDIO) if r["language"] == "en"]
    sets = {"clips": english, "long": [build_long_file(english, cache)], "odd": build_odd_corpus(english, cache)}
    transcriber = Transcriber.load(settings)
    transcriber.transcribe(english[0]["path"])  # warm-up: graphs of the small buckets
    guards = transcriber.guards
    runs: dict[tuple[str, str], list[dict]] = {}
    for k in range(args.rounds):
        for set_name, rows in sets.items():
            for mode, (at_once, budgets) in MODES.items():
                transcriber.guards = dataclasses.replace(guards, fallback_at_once=at_once or guards.fallback_at_once)
                transcriber.engine.token_budgets = budgets
                res = run_once(transcriber, rows)
                runs.setdefault((mode, set_name), []).append(res)
                print(f"round {k + 1}/{args.rounds} {set_name:5s} {mode}: {res['wall']:.2f} s, {res['batches']} batches, "
                      f"WER {res['wer'] * 100:.2f}%", flush=True)
    print("\n| setting | set | batches | encoder rows | fallback rows | wall s (median) | wall s of each round | WER |")
    print("|---|---|---:|---:|---:|---:|---|---:|")
    for set_name in sets:
        for mode in MODES:
            rs = runs[(mode, set_name)]
            last = rs[-1]
            walls = " / ".join(f"{r['wall']:.1f}" for r in rs)
            print(f"| {mode} | {set_name} | {last['batches']} | {last['encoder_rows']} | {last['fallback_rows']} | "
                  f"{statistics.median(r['wall'] for r in rs):.2f} | {walls} | {last['wer'] * 100:.1f}% |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
