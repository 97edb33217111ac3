"""Shared encoder rows in one process: encoder rows, decode time and WER, sharing off vs on (CPU).

How well short files of different names share 30 s encoder rows (batch_job/shared_rows.py)
depends on which files meet in a row, so one set of clips says little. This runs the engine
(``Transcriber.transcribe_many``, one model load, ``tiny.en``) over several sets of N of the
many-files clips (benchmarks/many_files.py ``select_clips``): the two halves (every other clip)
and random draws (fixed seed), and pools the encoder rows the engine ran, the decode wall time
and the WER over all of them, for ``share_rows`` off and on.

    python benchmarks/shared_rows.py                 # 6 sets of 20 of the 40 clips, 1 thread
    python benchmarks/shared_rows.py --sets 2 --size 10
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from corpus import error_rates  # noqa: E402
from many_files import select_clips  # noqa: E402


def clip_sets(clips: list[dict], n_sets: int, size: int, seed: int) -> list[list[dict]]:
    """The two halves of ``clips`` (every other one, cut to ``size``) then random draws of ``size``."""
    rng = random.Random(seed)
    halves = [clips[i::2][:size] for i in range(2)]
    draws = [rng.sample(clips, min(size, len(clips))) for _ in range(max(0, n_sets - 2))]
    return (halves + draws)[:n_sets]


def measure(transcriber, sets: list[list[dict]]) -> dict:
    """Encoder rows, decode seconds and pooled WER of ``transcriber`` over ``sets``."""
    rows = 0
    original = transcriber.engine.decode

    def counting(audio, options, **kw):
        nonlocal rows
        rows += len(audio)
        return original(audio, options, **kw)

    transcriber.engine.decode = counting
    seconds, scored = 0.0, []
    try:
        for clips in sets:
            t0 = time.perf_counter()
            hyp = {r.name: r.transcript.text for r in transcriber.transcribe_many([(c["path"], c["path"]) for c in clips])}
            seconds += time.perf_counter() - t0
            scored += [{**c, "hyp": hyp[c["path"]]} for c in clips]
    finally:
        transcriber.engine.decode = original
    return {"rows": rows, "seconds": seconds, "wer": error_rates(scored, multilingual=False)["en"]["rate"],
            "decodes": len(scored)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--limit", type=int, default=40, help="clips to draw the sets from (default 40)")
    p.add_argument("--sets", type=int, default=6, help="sets of clips (default 6: 2 halves, 4 draws)")
    p.add_argument("--size", type=int, default=20, help="clips per set (default 20)")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cache-dir", default=None, help="model cache (default: the settings' default)")
    args = p.parse_args(argv)
    if args.sets < 1 or args.size < 2:
        p.error("need --sets >= 1 and --size >= 2")

    import torch

    from batch_job.settings import Settings
    from batch_job.transcribe import Transcriber

    torch.set_num_threads(args.threads)
    sets = clip_sets(select_clips(args.limit, 4, 20), args.sets, args.size, args.seed)
    base = Settings.from_env({}, model="tiny.en", threads=args.threads,
                             **({"cache_dir": args.cache_dir} if args.cache_dir else {}))
    engine = Transcriber.load(base).engine  # one model load; a Transcriber per setting over it
    print("| share_rows | clip-decodes | encoder rows | decode s | WER |\n|---|---:|---:|---:|---:|")
    for share in (False, True):
        r = measure(Transcriber(engine, dataclasses.replace(base, share_rows=share)), sets)
        print(f"| {'on' if share else 'off'} | {r['decodes']} | {r['rows']} | {r['seconds']:.1f} | "
              f"{100 * r['wer']:.1f}% |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
