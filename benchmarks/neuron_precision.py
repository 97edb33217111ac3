"""bf16 vs fp32 Neuron graphs: accuracy of the graphs ``whisper-batch compile`` builds, on CPU.

Decodes the first ``--limit`` English clips of ../shared/audio (``WHISPER_BATCH_SHARED_AUDIO``
overrides; clips <= 30 s, one window each) with the Neuron step graphs (``build_graphs``,
``torch.jit.trace``-d, the alias emulator standing in for the runtime) in float32 and in
bfloat16, in batches of ``--batch-size``, and prints a table: WER against the references (Whisper's
English normalizer), transcripts identical to fp32, wall seconds. bf16 matmuls are slow on a CPU
without native bf16, so keep ``--limit`` small; the wall time says nothing about inf2.

    python benchmarks/neuron_precision.py --limit 16 --model tiny.en
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from corpus import REPO, SHARED_AUDIO, read_manifest  # noqa: E402

sys.path.insert(0, str(REPO))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny.en")
    parser.add_argument("--limit", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)

    import jiwer
    import torch
    from whisper_normalizer.english import EnglishTextNormalizer

    from batch_job.audio import load_audio
    from batch_job.engine.decoding import DecodingOptions, decode_batch
    from batch_job.engine.graphs import CacheShape, StatefulInference
    from batch_job.engine.loading import model_bundle
    from batch_job.engine.models import load_model
    from batch_job.engine.neuron.compile import build_graphs, trace_jit
    from batch_job.engine.neuron.runtime import step_states
    from batch_job.engine.runner import Engine
    from batch_job.settings import Settings

    torch.set_num_threads(args.threads)
    entries = [e for e in read_manifest(SHARED_AUDIO) if e["language"] == "en" and e["seconds"] <= 30][: args.limit]
    rows = [load_audio(e["path"]) for e in entries]
    settings = Settings.from_env().replace(model=args.model, device="cpu", quantize_decoder=False, encoder_dtype="float32",
                                           batch_size=args.batch_size, max_new_tokens=args.max_tokens)
    loaded = load_model(args.model, cache_dir=settings.cache_dir)
    engine = Engine(model_bundle(loaded, settings, "cpu"))  # log-mel, tokens and text only
    dims, B = engine.dims, args.batch_size
    options = DecodingOptions(max_new_tokens=engine.max_new_tokens)
    norm = EnglishTextNormalizer()
    refs = [norm(e["text"]) for e in entries]
    texts, seconds = {}, {}
    for dtype in ("float32", "bfloat16"):
        graphs = build_graphs(loaded, B, engine.cache_len, dtype)
        encoder, step = trace_jit(graphs)
        states = step_states(step, 4 * dims.layers)
        inference = StatefulInference(encoder, step, states, CacheShape(dims.layers, B, dims.heads, engine.cache_len,
                                      dims.head_dim), dtype=getattr(torch, dtype), emulate_aliases=True)
        out, t0 = [], time.perf_counter()
        with torch.inference_mode():
            for i in range(0, len(rows), B):
                chunk = rows[i : i + B]
                inference.start(engine.log_mel(chunk, B))
                out += [engine.text(r.tokens) for r in decode_batch(inference, engine.tokens, options, n_rows=len(chunk), batch_size=B)]
        seconds[dtype], texts[dtype] = time.perf_counter() - t0, out
    print(f"model {args.model}, {len(entries)} English clips ({sum(e['seconds'] for e in entries):.0f} s), batch {B}, "
          f"torch {torch.__version__}, {args.threads} threads")
    print("| graphs | WER | transcripts identical to fp32 | wall s (CPU) |")
    print("|---|---:|---:|---:|")
    for dtype in ("float32", "bfloat16"):
        wer = jiwer.wer(refs, [norm(t) for t in texts[dtype]])
        same = sum(a == b for a, b in zip(texts[dtype], texts["float32"]))
        print(f"| {dtype} | {100 * wer:.2f}% | {same}/{len(entries)} | {seconds[dtype]:.1f} |")
    for a, b, e in zip(texts["float32"], texts["bfloat16"], entries):
        if a != b:
            print(f"  {e['audio']}:\n    fp32: {a!r}\n    bf16: {b!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
