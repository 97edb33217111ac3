"""``whisper-batch compile``: trace the engine's graphs for Inferentia2 and write them + a manifest.

The modules handed to ``torch_neuronx.trace`` come from :func:`build_graphs`: the engine's own
:class:`~batch_job.engine.graphs.EncoderGraph` and :class:`~batch_job.engine.graphs.DecoderStepGraph`,
cast to the compile dtype (bfloat16 by default, layer norms float32), the step wrapped as a
:class:`~batch_job.engine.graphs.StatefulDecoderStep` whose caches are per-layer state aliased to
its outputs. Per batch size ``B``:

* ``encoder``: ``mel [B, n_mels, 3000]`` -> ``(cross_k, cross_v)`` ``[L, B, H, 1500, Dh]``;
* ``step``: ``(tokens [B, 1] int32, position [1] int32)`` -> ``(logits [B, V] float32,
  *4L cache states)``, ``input_output_aliases`` = state ``j`` -> output ``j + 1``.

Next to the graphs the compile writes what the engine needs besides them (special tokens,
dims, mel filters, tokenizer), so a Neuron job never builds an eager transformers model.

torch-neuronx / neuronx-cc are imported only inside :func:`trace_neuron`. ``--backend jit``
writes the same artifacts with ``torch.jit.trace`` of the same modules (no Neuron needed): the
whole save -> manifest -> load -> decode path runs on CPU, aliasing emulated.
``--plan`` prints the device and host memory plan (:mod:`batch_job.engine.neuron.plan`) instead.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from batch_job.errors import ModelError

log = logging.getLogger(__name__)

DTYPES = ("bfloat16", "float32")
DEFAULT_DTYPE = "bfloat16"

#: neuronx-cc flags for both graphs: transformer-tuned scheduling, target inf2 (so ``--cpu-backend``
#: builds need no device), saturate infinities (the NaN guard the AWS Whisper sample compiles
#: with). bfloat16 graphs are compiled as written (their float32 parts are deliberate); float32
#: graphs get their matmuls auto-cast to bf16.
BASE_COMPILER_ARGS: tuple[str, ...] = ("--model-type=transformer", "--target=inf2", "--enable-saturate-infinity", "-O2")
AUTO_CAST_ARGS: dict[str, tuple[str, ...]] = {
    "bfloat16": ("--auto-cast=none",),
    "float32": ("--auto-cast=matmult", "--auto-cast-type=bf16"),
}


def compiler_args_for(dtype: str) -> tuple[str, ...]:
    """The neuronx-cc flags for graphs of ``dtype``."""
    return BASE_COMPILER_ARGS + AUTO_CAST_ARGS[dtype]


COMPILER_ARGS = compiler_args_for(DEFAULT_DTYPE)

NEURON_REPO = "https://pip.repos.neuron.amazonaws.com"
NEURON_HINT = (
    "torch-neuronx is not installed. It comes from the AWS Neuron pip repository, not PyPI (the PyPI "
    f"names are placeholders): pip install --extra-index-url {NEURON_REPO} 'whisper-batch[neuron]', or run "
    "inside the AWS Neuron PyTorch image (batch_job/Dockerfile). To test the artifact path on CPU "
    "without Neuron, use --backend jit."
)


# --------------------------------------------------------------------------------------------
# the graphs
# --------------------------------------------------------------------------------------------


@dataclass
class GraphSet:
    """Everything one batch size needs for tracing: the modules, example inputs, aliases, shapes."""

    batch_size: int
    cache_len: int
    dtype: str
    encoder: Any
    """:class:`~batch_job.engine.graphs.EncoderGraph`, traced on ``encoder_inputs``."""
    step: Any
    """:class:`~batch_job.engine.graphs.StatefulDecoderStep`, traced on ``step_inputs``."""
    encoder_inputs: tuple
    """``(mel,)``."""
    step_inputs: tuple
    """``(tokens, position)``: the step's only per-call inputs."""
    aliases: dict
    """``{state parameter: output index}`` (``input_output_aliases``)."""


def graph_shapes(dims: Any, batch_size: int, cache_len: int, dtype: str = DEFAULT_DTYPE,
                 alignment_heads: int = 0) -> dict[str, dict[str, Any]]:
    """Inputs, state and outputs of both graphs for one batch size, as the engine expects them (manifest form).

    ``dims`` has ``layers``, ``heads``, ``head_dim``, ``n_mels`` and ``vocab_size``
    (:class:`~batch_job.engine.bundle.ModelDims`); ``alignment_heads`` > 0 adds the step's
    ``alignment [B, A, 1500]`` float32 output (word timestamps).
    """
    from batch_job.constants import N_AUDIO_CTX as SOURCE_POSITIONS
    from batch_job.constants import N_FRAMES
    from batch_job.engine.graphs import STATE_KINDS

    L, H, Dh, B = int(dims.layers), int(dims.heads), int(dims.head_dim), int(batch_size)

    def t(shape, dt=dtype):
        return {"shape": list(shape), "dtype": dt}

    cross = t((L, B, H, SOURCE_POSITIONS, Dh))
    step_outputs = {"logits": t((B, int(dims.vocab_size)), "float32")}
    if alignment_heads:
        step_outputs["alignment"] = t((B, int(alignment_heads), SOURCE_POSITIONS), "float32")
    state_shapes = {"self_k": (B, H, cache_len, Dh), "self_v": (B, H, cache_len, Dh),
                    "cross_k": (B, H, SOURCE_POSITIONS, Dh), "cross_v": (B, H, SOURCE_POSITIONS, Dh)}
    return {
        "encoder": {
            "inputs": {"mel": t((B, int(dims.n_mels), N_FRAMES))},
            "outputs": {"cross_k": cross, "cross_v": cross},
        },
        "step": {
            "inputs": {"tokens": t((B, 1), "int32"), "position": t((1,), "int32")},
            "state": {kind: {**t(state_shapes[kind]), "layers": L} for kind in STATE_KINDS},
            "state_order": list(STATE_KINDS),
            "outputs": step_outputs,
        },
    }


def recorded_shapes(graphs: GraphSet, encoder_outputs: Sequence[Any], logits: Any,
                    alignment: Any = None) -> dict[str, dict[str, Any]]:
    """The manifest's graph entry read off the real tensors: example inputs, state parameters, outputs.

    Recorded rather than computed, so the manifest shows what the traced graphs take and hold;
    :func:`graph_shapes` is what the engine checks them against at load.
    """
    from batch_job.engine.graphs import STATE_KINDS

    def t(tensor):
        return {"shape": list(tensor.shape), "dtype": str(tensor.dtype).removeprefix("torch.")}

    step = graphs.step
    state = {}
    for kind in STATE_KINDS:
        tensors = step.kind(kind)
        if any(t(x) != t(tensors[0]) for x in tensors):
            raise ModelError(f"{kind} states differ in shape or dtype across layers")
        state[kind] = {**t(tensors[0]), "layers": len(tensors)}
    return {
        "encoder": {
            "inputs": {"mel": t(graphs.encoder_inputs[0])},
            "outputs": dict(zip(("cross_k", "cross_v"), (t(x) for x in encoder_outputs))),
        },
        "step": {
            "inputs": dict(zip(("tokens", "position"), (t(x) for x in graphs.step_inputs))),
            "state": state,
            "state_order": list(STATE_KINDS),
            "outputs": {"logits": t(logits), **({"alignment": t(alignment)} if alignment is not None else {})},
        },
    }


def build_graphs(loaded, batch_size: int, cache_len: int, dtype: str = DEFAULT_DTYPE,
                 alignment_heads: Sequence[tuple[int, int]] = ()) -> GraphSet:
    """The engine's modules at ``batch_size`` in ``dtype``, ready for tracing, with example inputs.

    A bfloat16 set works on a cast copy of ``loaded.model`` (:func:`~batch_job.engine.graphs.cast_for_inference`:
    layer norms stay float32); a float32 set shares its modules. Used by ``whisper-batch compile``,
    the lowering check and the tests.
    """
    import copy

    import torch

    from batch_job.constants import N_FRAMES
    from batch_job.engine.graphs import DecoderStepGraph, EncoderGraph, StatefulDecoderStep, cast_for_inference

    if dtype not in DTYPES:
        raise ModelError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    torch_dtype = getattr(torch, dtype)
    model = loaded.model.to(torch.device("cpu"), dtype=torch.float32).eval()
    if torch_dtype != torch.float32:
        model = cast_for_inference(copy.deepcopy(model), torch_dtype)
    config = model.config
    if cache_len > int(config.max_target_positions):
        raise ModelError(f"cache length {cache_len} exceeds the model's {config.max_target_positions} positions")
    encoder = EncoderGraph(model).eval()
    step = StatefulDecoderStep(DecoderStepGraph(model, alignment_heads).eval(), batch=int(batch_size), cache_len=int(cache_len),
                               dtype=torch_dtype).eval()
    mel = torch.zeros(batch_size, int(config.num_mel_bins), N_FRAMES, dtype=torch_dtype)
    step_inputs = (
        torch.full((batch_size, 1), loaded.tokens.sot, dtype=torch.int32),
        torch.tensor([0], dtype=torch.int32),
    )
    return GraphSet(
        batch_size=int(batch_size),
        cache_len=int(cache_len),
        dtype=dtype,
        encoder=encoder,
        step=step,
        encoder_inputs=(mel,),
        step_inputs=step_inputs,
        aliases=step.aliases,
    )


# --------------------------------------------------------------------------------------------
# tracing
# --------------------------------------------------------------------------------------------


def trace_jit(graphs: GraphSet) -> tuple[Any, Any]:
    """``torch.jit.trace`` both modules on CPU (the test/``--backend jit`` stand-in for Neuron)."""
    import torch

    with torch.no_grad():
        encoder = torch.jit.trace(graphs.encoder, graphs.encoder_inputs, check_trace=False)
        step = torch.jit.trace(graphs.step, graphs.step_inputs, check_trace=False)
    return encoder, step


def trace_neuron(
    graphs: GraphSet,
    *,
    compiler_args: Sequence[str] | None = None,
    cpu_backend: bool = False,
    workdir: str | Path | None = None,
) -> tuple[Any, Any]:  # pragma: no cover - needs torch-neuronx (Neuron SDK)
    """``torch_neuronx.trace`` both modules (weights kept out of the NEFF, every cache aliased)."""
    try:
        import torch_neuronx
    except ImportError as exc:
        raise ModelError(NEURON_HINT) from exc
    import torch

    args = list(compiler_args if compiler_args is not None else compiler_args_for(graphs.dtype))
    common: dict[str, Any] = {"compiler_args": args, "inline_weights_to_neff": False}
    if cpu_backend:
        common["cpu_backend"] = True
    wd = Path(workdir) if workdir else None
    with torch.no_grad():
        encoder = torch_neuronx.trace(
            graphs.encoder,
            graphs.encoder_inputs,
            compiler_workdir=str(wd / f"b{graphs.batch_size}-encoder") if wd else None,
            **common,
        )
        step = torch_neuronx.trace(
            graphs.step,
            graphs.step_inputs,
            input_output_aliases=graphs.aliases,
            compiler_workdir=str(wd / f"b{graphs.batch_size}-step") if wd else None,
            **common,
        )
    return encoder, step


# --------------------------------------------------------------------------------------------
# compile: trace every bucket, save, side data, manifest
# --------------------------------------------------------------------------------------------


def compile_model(
    loaded,
    out_dir: str | Path,
    *,
    batch_sizes: Sequence[int],
    max_new_tokens: int,
    backend: str = "neuron",
    dtype: str = DEFAULT_DTYPE,
    cpu_backend: bool = False,
    compiler_args: Sequence[str] | None = None,
    workdir: str | Path | None = None,
    word_timestamps: bool = False,
) -> dict[str, Any]:
    """Trace and save the graphs of ``loaded`` for every batch size; returns the manifest written.

    Layout: ``out_dir/b<B>/encoder.pt``, ``out_dir/b<B>/step.pt`` (``torch.jit.save``), the side
    data (``mel_filters.npy``, ``tokenizer.json``) and ``out_dir/manifest.json``, written last
    (an interrupted compile leaves no manifest). ``word_timestamps``: the step also returns the
    checkpoint's alignment heads' attention (recorded as ``alignment_heads`` in the manifest).
    """
    import torch

    from batch_job.constants import PROMPT_SLOTS, static_cache_len
    from batch_job.engine.artifacts import MANIFEST_NAME, write_manifest, write_side_data
    from batch_job.engine.bundle import ModelDims, checkpoint_parts
    from batch_job.engine.models import word_timing_heads
    from batch_job.engine.neuron.manifest import FORMAT, installed_versions

    if backend not in ("neuron", "jit"):
        raise ModelError(f"unknown backend {backend!r}: use neuron or jit")
    if dtype not in DTYPES:
        raise ModelError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    sizes = sorted({int(b) for b in batch_sizes})
    if not sizes or sizes[0] < 1:
        raise ModelError(f"batch sizes must be >= 1, got {list(batch_sizes)}")
    args = list(compiler_args if compiler_args is not None else compiler_args_for(dtype))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST_NAME).unlink(missing_ok=True)  # incomplete until the new manifest is written
    config = loaded.model.config
    cache_len = static_cache_len(config.max_target_positions, max_new_tokens)
    heads = word_timing_heads(loaded) if word_timestamps else ()
    dims = ModelDims.from_config(config, cache_len)
    mel, text = checkpoint_parts(loaded)
    side = write_side_data(out, tokens=loaded.tokens, dims=dims, mel=mel, text=text, alignment_heads=heads)
    graphs_entry: dict[str, Any] = {}
    timings: dict[str, float] = {}
    for b in sizes:
        graphs = build_graphs(loaded, b, cache_len, dtype, heads)
        with torch.no_grad():  # one eager run: the real output shapes and dtypes for the manifest
            encoder_outputs = graphs.encoder(*graphs.encoder_inputs)
            outputs = graphs.step(*graphs.step_inputs)
        entry = recorded_shapes(graphs, encoder_outputs, outputs[0], outputs[-1] if heads else None)
        del outputs
        del encoder_outputs
        t0 = time.perf_counter()
        if backend == "neuron":
            encoder, step = trace_neuron(graphs, compiler_args=args, cpu_backend=cpu_backend, workdir=workdir)
        else:
            encoder, step = trace_jit(graphs)
        timings[str(b)] = round(time.perf_counter() - t0, 2)
        bdir = out / f"b{b}"
        if bdir.exists():
            shutil.rmtree(bdir)
        bdir.mkdir(parents=True)
        torch.jit.save(encoder, str(bdir / "encoder.pt"))
        torch.jit.save(step, str(bdir / "step.pt"))
        entry["encoder"]["file"] = f"b{b}/encoder.pt"
        entry["step"]["file"] = f"b{b}/step.pt"
        graphs_entry[str(b)] = entry
        log.info("batch %d: traced (%s, %s) in %.1f s", b, backend, dtype, timings[str(b)])
    versions = installed_versions()
    manifest = {
        "format": FORMAT,
        "backend": backend,
        "model": {"id": loaded.name, "checksum": loaded.checksum},
        "dtype": dtype,
        "compiler_args": args if backend == "neuron" else [],
        "cpu_backend": bool(cpu_backend) if backend == "neuron" else None,
        "inline_weights_to_neff": False if backend == "neuron" else None,
        "cache_len": cache_len,
        "max_new_tokens": cache_len - PROMPT_SLOTS,
        "batch_sizes": sizes,
        "graphs": graphs_entry,
        **side,
        "trace_seconds": timings,
        "versions": versions,
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    write_manifest(out, manifest)
    return manifest


def parse_sizes(batch_size: int, buckets: str | None) -> list[int]:
    """``--batch-size`` plus the comma-separated ``--buckets`` as a sorted list."""
    sizes = {int(batch_size)}
    for part in (buckets or "").split(","):
        if part.strip():
            sizes.add(int(part))
    if min(sizes) < 1:
        raise ValueError(f"batch sizes must be >= 1: {sorted(sizes)}")
    return sorted(sizes)


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "compile",
        help="compile the encoder/decoder-step graphs for Inferentia2 (torch-neuronx) into DIR",
        description="Trace the engine's graphs per batch size with torch_neuronx.trace and write DIR/b<B>/"
                    "{encoder,step}.pt + DIR/manifest.json. Exit 78 on a model/config error.",
    )
    p.add_argument("--model", help="model name, checkpoint directory or cached hub id (default $WHISPER_BATCH_MODEL)")
    p.add_argument("--batch-size", type=int, help="largest batch size compiled (default $WHISPER_BATCH_BATCH_SIZE)")
    p.add_argument("--buckets", help="extra, smaller batch sizes to compile, comma-separated (e.g. 1,2,4)")
    p.add_argument("--max-tokens", type=int, help="generated tokens per window = static cache length - prompt "
                                                  "(default $WHISPER_BATCH_MAX_NEW_TOKENS)")
    p.add_argument("--out", help="output directory (WHISPER_BATCH_COMPILED_DIR at run time); required unless --plan")
    p.add_argument("--dtype", choices=DTYPES, default=DEFAULT_DTYPE,
                   help="weights, caches and activations (layer norms, softmax and logits stay float32); default bfloat16")
    p.add_argument("--plan", action="store_true",
                   help="print the device and host memory plan for these settings and exit (from the model's config; "
                        "no weights needed for known hub ids such as openai/whisper-large-v3)")
    p.add_argument("--cpu-backend", action="store_true",
                   help="compile without a Neuron device (torch_neuronx.trace(cpu_backend=True), target inf2)")
    p.add_argument("--backend", choices=("neuron", "jit"), default="neuron",
                   help="neuron (default) or jit: torch.jit.trace on CPU, same artifacts, for testing the load path")
    p.add_argument("--compiler-workdir", help="keep neuronx-cc work files (logs, NEFFs) here")
    p.add_argument("--word-timestamps", action="store_true",
                   help="the step also returns the alignment heads' attention: needed by jobs with word timestamps")
    p.set_defaults(func=_command)


def _command(args: argparse.Namespace) -> int:
    from batch_job import exit_codes
    from batch_job.constants import static_cache_len
    from batch_job.settings import Settings

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        settings = Settings.from_env().replace(
            model=args.model, batch_size=args.batch_size, max_new_tokens=args.max_tokens
        )
        sizes = parse_sizes(settings.batch_size, args.buckets)
    except (ValueError, TypeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exit_codes.CONFIG_ERROR
    if args.plan:
        from batch_job.engine.neuron import plan

        try:
            dims = plan.dims_for_model(settings.model, settings.cache_dir)
        except ModelError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return exit_codes.CONFIG_ERROR
        cache_len = static_cache_len(dims.max_target_positions, settings.max_new_tokens)
        print(plan.format_plan(plan.plan(dims, sizes, cache_len, dtype=args.dtype)))
        return exit_codes.OK
    if not args.out:
        print("error: --out DIR is required (or --plan)", file=sys.stderr)
        return exit_codes.CONFIG_ERROR
    if args.backend == "neuron" and importlib.util.find_spec("torch_neuronx") is None:
        print(f"error: {NEURON_HINT}", file=sys.stderr)
        return exit_codes.CONFIG_ERROR
    from batch_job.engine.models import load_model

    t0 = time.perf_counter()
    try:
        loaded = load_model(settings.model, cache_dir=settings.cache_dir)
        manifest = compile_model(
            loaded,
            args.out,
            batch_sizes=sizes,
            max_new_tokens=settings.max_new_tokens,
            backend=args.backend,
            dtype=args.dtype,
            cpu_backend=args.cpu_backend,
            workdir=args.compiler_workdir,
            word_timestamps=args.word_timestamps,
        )
    except ModelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exit_codes.CONFIG_ERROR
    print(
        f"compiled {manifest['model']['id']} ({args.backend}, {manifest['dtype']}) batch sizes {manifest['batch_sizes']}, "
        f"cache_len {manifest['cache_len']} -> {args.out} in {time.perf_counter() - t0:.1f} s"
    )
    return exit_codes.OK
