"""One-shot smoke test for the first run on a real Inferentia2 host (inf2.xlarge, inside the image).

    python scripts/neuron_smoke.py                      # on inf2: compile tiny.en, check, time
    python scripts/neuron_smoke.py --backend jit        # the same script on any CPU (no Neuron)

What it does, in order, and prints:

1. compiles ``tiny.en`` (the packaged weights, no download) for batch sizes 1, 2 and 8 with the
   product's own ``compile_model`` (bf16, the image's compiler flags) and loads the result with
   the product's own ``load_bundle`` (one NeuronCore);
2. correctness at B=2: the first decoder steps' logits of the compiled graphs against the CPU
   float32 engine on the same two clips (max |diff|, top-1 agreement), then both engines'
   transcripts of those clips;
3. speed per batch size: the encoder call plus the cross-K/V copy into the step's state
   (``start``), the mean decoder step over ``--steps`` steps, and a per-core real-time factor for
   a 30 s window decoded in ``--tokens-per-window`` steps (an assumption, printed).

Exit status 0 when the compiled graphs agree with the CPU (top-1 on every checked step), 1
otherwise. Nothing here is imported by the product.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CLIPS = ("jfk.flac", "librispeech_61-70968-0000.flac")
WINDOW_SECONDS = 30.0


def _rows(audio_dir: Path):
    import numpy as np

    from batch_job.audio import load_audio

    paths = [audio_dir / name for name in CLIPS]
    if all(p.is_file() for p in paths):
        return [load_audio(p) for p in paths], [p.name for p in paths]
    rng = np.random.default_rng(0)  # no shared clips here: noise still exercises every shape
    return [rng.standard_normal(16000 * 10).astype("float32") * 0.01 for _ in CLIPS], ["noise-1", "noise-2"]


def _first_logits(inference, engine, mel, steps: int):
    """Logits of the first ``steps`` greedy steps from <|sot|>, feeding the CPU reference's tokens."""
    import torch

    inference.start(mel)
    out, tokens = [], torch.full((mel.shape[0], 1), engine.tokens.sot, dtype=torch.long)
    for position in range(steps):
        logits = inference.logits(tokens, position).float()
        out.append(logits)
        tokens = logits.argmax(dim=-1, keepdim=True)
    inference.finish()
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=("neuron", "jit"), default="neuron")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    parser.add_argument("--batch-sizes", default="1,2,8")
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--steps", type=int, default=50, help="decoder steps timed per batch size")
    parser.add_argument("--check-steps", type=int, default=3, help="steps whose logits are compared with CPU")
    parser.add_argument("--tokens-per-window", type=int, default=100,
                        help="decoder steps per 30 s window assumed for the real-time factor")
    parser.add_argument("--audio-dir", default=str(REPO.parent / "shared" / "audio"))
    parser.add_argument("--out", help="compiled graphs directory (default: a temporary one)")
    args = parser.parse_args(argv)

    import torch

    from batch_job.engine.decoding import DecodingOptions
    from batch_job.engine.graphs import CacheShape
    from batch_job.engine.loading import model_bundle
    from batch_job.engine.models import load_model
    from batch_job.engine.neuron.compile import compile_model
    from batch_job.engine.neuron.runtime import load_bundle
    from batch_job.engine.runner import Engine
    from batch_job.settings import Settings

    sizes = sorted({int(b) for b in args.batch_sizes.split(",")} | {2})
    out = Path(args.out or tempfile.mkdtemp(prefix="neuron-smoke-"))
    settings = Settings.from_env().replace(model="tiny.en", batch_size=max(sizes), max_new_tokens=args.max_tokens,
                                           compiled_dir=str(out), quantize_decoder=False, jit_decoder=False)
    print(f"== compile tiny.en ({args.backend}, {args.dtype}) batch sizes {sizes} -> {out}")
    loaded = load_model("tiny.en", cache_dir=settings.cache_dir)
    t0 = time.perf_counter()
    compile_model(loaded, out, batch_sizes=sizes, max_new_tokens=args.max_tokens, backend=args.backend, dtype=args.dtype)
    print(f"   compiled in {time.perf_counter() - t0:.1f} s")
    t0 = time.perf_counter()
    bundle = load_bundle(settings)
    print(f"   loaded onto the device in {time.perf_counter() - t0:.1f} s (NEURON_RT_NUM_CORES={os.environ.get('NEURON_RT_NUM_CORES')})")

    cpu = Engine(model_bundle(loaded, settings.replace(device="cpu", batch_size=2), "cpu"))
    dims = bundle.dims
    rows, names = _rows(Path(args.audio_dir))
    mel = cpu.log_mel(rows, 2)

    def inference(b):
        return bundle.graphs[b].inference(CacheShape(dims.layers, b, dims.heads, dims.cache_len, dims.head_dim))

    print(f"== correctness at B=2: first {args.check_steps} steps' logits, compiled vs CPU float32")
    ok = True
    with torch.inference_mode():
        want = _first_logits(cpu._inference[2], cpu, mel, args.check_steps)
        got = _first_logits(inference(2), cpu, mel, args.check_steps)
    for step, (w, g) in enumerate(zip(want, got)):
        agree = bool((w.argmax(-1) == g.argmax(-1)).all())
        ok &= agree
        print(f"   step {step}: max |diff| {float((w - g).abs().max()):.4f}  top-1 agree {agree}")
    neuron = Engine(bundle)
    options = DecodingOptions(max_new_tokens=cpu.max_new_tokens)
    with torch.inference_mode():
        for name, a, b in zip(names, cpu.decode(rows, options)[0], neuron.decode(rows, options)[0]):
            print(f"   {name}\n     cpu:      {cpu.text(a.tokens)!r}\n     compiled: {neuron.text(b.tokens)!r}")

    print(f"== speed ({args.steps} steps per batch size; real-time factor assumes {args.tokens_per_window} "
          f"steps per {WINDOW_SECONDS:.0f} s window)")
    print("   B  start ms  step ms  windows/s  x real time per core")
    for b in sizes:
        inf = inference(b)
        batch_mel = cpu.log_mel(rows[:1] * b, b)
        tokens = torch.full((b, 1), cpu.tokens.sot, dtype=torch.long)
        with torch.inference_mode():
            inf.start(batch_mel)  # warm-up
            t0 = time.perf_counter()
            inf.start(batch_mel)
            start_s = time.perf_counter() - t0
            inf.logits(tokens, 0)
            t0 = time.perf_counter()
            for position in range(1, min(args.steps, dims.cache_len - 1) + 1):
                inf.logits(tokens, position)
            step_s = (time.perf_counter() - t0) / min(args.steps, dims.cache_len - 1)
        window_s = start_s + args.tokens_per_window * step_s
        print(f"   {b:<2} {start_s * 1e3:8.1f} {step_s * 1e3:8.2f} {b / window_s:10.2f} {b * WINDOW_SECONDS / window_s:12.1f}")
    print("OK: compiled graphs agree with CPU" if ok else "FAIL: compiled graphs disagree with CPU (top-1)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
