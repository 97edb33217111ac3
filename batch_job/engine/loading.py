"""Loading an engine: the ONE module where devices differ.

:func:`load_engine` resolves the device and gets a :class:`~batch_job.engine.bundle.ModelBundle`
one of three ways, then builds the :class:`~batch_job.engine.runner.Engine` from it:

* ``cpu``: the decoder's Linear layers dynamically quantized to int8; the encoder in bfloat16
  where the CPU multiplies it natively (``encoder_dtype``,
  :class:`~batch_job.engine.graphs.CastEncoder`; the cross K/V it hands the decoder stay
  bfloat16, half the bytes each step reads, except with word timestamps), else float32 (an int8 encoder costs several
  WER points); with ``jit_decoder`` (the default) both graphs are ``torch.jit.trace``-d and
  saved in the graph cache (:mod:`batch_job.engine.graph_cache`), so later starts load them
  without transformers. The cache key is computed here, from the checkpoint's checksum
  (:mod:`batch_job.engine.models`), before anything is loaded;
* ``cuda``: eager PyTorch on the GPU (the step traced per bucket on first use);
* ``neuron``: graphs compiled ahead of time by ``whisper-batch compile`` (bfloat16, caches as
  device state), loaded from ``settings.compiled_dir`` with the side data saved next to them:
  no transformers model is built (:mod:`batch_job.engine.neuron.runtime`).
"""

from __future__ import annotations

import logging
import time

from batch_job.constants import static_cache_len
from batch_job.engine import graph_cache
from batch_job.engine.bundle import BucketGraphs, Device, ModelBundle, ModelDims, batch_buckets, checkpoint_parts
from batch_job.engine.graph_cache import CacheSlot
from batch_job.engine.loaded_model import LoadedModel
from batch_job.engine.models import load_model, resolve_checkpoint, weights_checksum, word_timing_heads
from batch_job.engine.runner import Engine
from batch_job.errors import ModelError
from batch_job.settings import Settings, usable_cores

log = logging.getLogger(__name__)

ENCODER_DTYPES = ("auto", "float32", "bfloat16")
MMAP_THRESHOLD_BYTES = 16 * 1024 * 1024
_SOURCES = {"cache": "graph cache", "model": "built from the checkpoint", "compiled": "compiled graphs"}


def load_engine(settings: Settings) -> Engine:
    """Load ``settings.model`` for ``settings.device``; raises ModelError with a clear reason.

    On CPU with ``jit_decoder`` the graphs come from the graph cache when present (no
    transformers import, no quantization, no tracing); otherwise they are built from the
    checkpoint and saved there for the next start.
    """
    t0 = time.perf_counter()
    import torch

    _quiet_warnings()
    bound_heap_growth()
    torch.set_num_threads(settings.threads or usable_cores())
    device = resolve_device(settings.device)
    bundle = None
    slot = cache_slot(settings) if uses_graph_cache(settings, device) else None
    if slot is not None:
        bundle = slot.load(settings.model)
    if bundle is None and device == "neuron":
        from batch_job.engine.neuron.runtime import load_bundle

        bundle = load_bundle(settings)  # the compiled graphs and their side data: no eager model
    if bundle is None:
        _quiet_libraries()
        try:
            bundle = model_bundle(load_model(settings.model, cache_dir=settings.cache_dir), settings, device)
        except ModelError:
            raise
        except Exception as exc:  # corrupt checkpoint, wrong architecture, ...
            raise ModelError(f"cannot load model {settings.model!r}: {exc}") from exc
        if slot is not None and bundle.traced is not None:
            slot.save(bundle, _key_fields(settings, bundle.checksum, bundle.dims.cache_len))
    engine = Engine(bundle)
    log.info(
        "model %s ready on %s in %.2f s (buckets %s, %s)", engine.model_name, device, time.perf_counter() - t0,
        engine.buckets, _SOURCES[bundle.source],
    )
    return engine


def resolve_device(requested: str) -> Device:
    """``auto`` -> ``neuron`` when torch-neuronx and a NeuronCore are present, else ``cuda``, else ``cpu``."""
    import torch

    if requested == "auto":
        from batch_job.engine.neuron.runtime import neuron_available

        if neuron_available():
            return "neuron"
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise ModelError("--device cuda requested but CUDA is not available")
    if requested not in ("cpu", "cuda", "neuron"):
        raise ModelError(f"unknown device {requested!r}: use auto, cpu, cuda or neuron")
    return requested  # type: ignore[return-value]


def model_bundle(loaded: LoadedModel, settings: Settings, device: Device) -> ModelBundle:
    """Build the engine's bundle from a transformers checkpoint (the cold path; CPU and CUDA).

    * ``cpu`` + ``jit_decoder``: encoder traced at batch 1 (batch-generic), step quantized to int8
      (``quantize_decoder``) and traced once per bucket; these are what the graph cache saves;
    * otherwise eager modules (the step traced lazily per bucket on CUDA with ``jit_decoder``).

    ``neuron`` never builds from the checkpoint: its bundle is the compiled directory's
    (:func:`batch_job.engine.neuron.runtime.load_bundle`), whatever ``loaded`` is.
    """
    if device == "neuron":
        from batch_job.engine.neuron.runtime import load_bundle

        return load_bundle(settings)
    import torch

    from batch_job.engine.graphs import CastEncoder, DecoderStepGraph, EncoderGraph, StackedCacheStep

    config = loaded.model.config
    dims = ModelDims.from_config(config, static_cache_len(config.max_target_positions, settings.max_new_tokens))
    heads = word_timing_heads(loaded) if settings.word_timestamps else ()
    model = loaded.model.to(torch.device("cuda" if device == "cuda" else "cpu"), dtype=torch.float32).eval()
    encoder = EncoderGraph(model).eval()
    step = StackedCacheStep(DecoderStepGraph(model, heads)).eval()
    sizes = batch_buckets(settings.batch_size)
    traced = None
    if device == "cpu" and settings.quantize_decoder:
        step = torch.ao.quantization.quantize_dynamic(step, {torch.nn.Linear}, dtype=torch.qint8)
    encoder_dtype = cpu_encoder_dtype(settings) if device == "cpu" else "float32"
    cross_dtype = "float32" if heads else encoder_dtype  # word timing reads the attention itself (CastEncoder)
    if encoder_dtype == "bfloat16":
        encoder = CastEncoder(encoder, torch.bfloat16, getattr(torch, cross_dtype)).eval()
    if uses_graph_cache(settings, device):
        traced = graph_cache.trace_cpu_graphs(encoder, step, dims, sizes, loaded.tokens.sot, cross_dtype=cross_dtype)
        graphs = graph_cache.bucket_graphs(traced, sizes)
    elif settings.jit_decoder:
        # One traced step graph per bucket (shapes differ), traced on first use.
        graphs = {b: BucketGraphs(encoder, LazyTracedStep(step)) for b in sizes}
    else:
        graphs = {b: BucketGraphs(encoder, step) for b in sizes}
    mel, text = checkpoint_parts(loaded)
    return ModelBundle(
        name=loaded.name,
        checksum=loaded.checksum,
        device=device,
        tokens=loaded.tokens,
        dims=dims,
        text=text,
        mel=mel,
        graphs=graphs,
        alignment_heads=heads,
        loaded=loaded,
        traced=traced,
    )


def cache_slot(settings: Settings) -> CacheSlot | None:
    """This engine's place in the CPU graph cache, from the checkpoint's checksum (nothing loaded).

    ``None`` when the checkpoint cannot be resolved yet: the cold path then reports why.
    """
    try:
        checkpoint = resolve_checkpoint(settings.model, settings.cache_dir)
        checksum = weights_checksum(checkpoint)
        max_positions = graph_cache.checkpoint_max_positions(checkpoint)
    except Exception as exc:  # noqa: BLE001 - the cold path reports model errors properly
        log.debug("graph cache: no key for %s (%s)", settings.model, exc)
        return None
    cache_len = static_cache_len(max_positions, settings.max_new_tokens)
    return CacheSlot.at(settings.cache_dir, _key_fields(settings, checksum, cache_len))


def _key_fields(settings: Settings, checksum: str, cache_len: int) -> dict:
    return graph_cache.key_fields(
        checksum=checksum, cache_len=cache_len, buckets=batch_buckets(settings.batch_size),
        quantize=settings.quantize_decoder, jit=settings.jit_decoder, encoder_dtype=cpu_encoder_dtype(settings),
        word_timestamps=settings.word_timestamps,
    )


def uses_graph_cache(settings: Settings, device: str) -> bool:
    """CPU with the traced decoder: the graphs are traced up front and cached (:mod:`batch_job.engine.graph_cache`)."""
    return device == "cpu" and bool(settings.jit_decoder)


def cpu_encoder_dtype(settings: Settings) -> str:
    """``settings.encoder_dtype`` resolved: ``auto`` is bfloat16 only where oneDNN multiplies it
    natively (emulated bf16 is slower than float32)."""
    choice = settings.encoder_dtype or "auto"
    if choice not in ENCODER_DTYPES:
        raise ValueError(f"encoder_dtype must be one of {', '.join(ENCODER_DTYPES)}, not {choice!r}")
    if choice != "auto":
        return choice
    import torch

    native = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return "bfloat16" if native else "float32"


class LazyTracedStep:
    """A decoder step that is ``torch.jit.trace``-d on its first call, with that call's real inputs.

    The step is pure, so tracing on the first call's inputs and returning the traced graph's
    outputs is exactly one step; every later call skips Python dispatch. Same module, same math
    as the eager step. Used on CUDA; on CPU every bucket is traced up front
    (:func:`batch_job.engine.graph_cache.trace_cpu_graphs`) so the graphs can be cached.
    """

    def __init__(self, step) -> None:
        self.step = step
        self.traced = None

    def __call__(self, *args):
        if self.traced is None:
            import torch

            with torch.inference_mode(False), torch.no_grad():
                self.traced = torch.jit.trace(self.step, args, check_trace=False)
        return self.traced(*args)


def bound_heap_growth(threshold: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Keep the encoder's large transient buffers out of glibc's heap (Linux/glibc only).

    glibc raises its mmap threshold after large blocks are freed, so the encoder's tens-of-MB
    activations end up on the heap and are never returned and peak RSS on long files keeps
    growing. Fixing the threshold (``mallopt``; same as ``MALLOC_MMAP_THRESHOLD_``) makes
    allocations of >= 16 MB mmapped and returned on free, at the cost of page faults on those
    buffers (measurements: docs/benchmarks.md). Returns True when applied.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        m_trim_threshold, m_mmap_threshold = -1, -3
        ok = libc.mallopt(m_mmap_threshold, threshold) == 1
        return ok and libc.mallopt(m_trim_threshold, threshold) == 1
    except (OSError, AttributeError):  # not glibc
        return False


def _quiet_libraries() -> None:
    """No weight-loading progress bars or deprecation chatter in job logs and CLI output (imports transformers)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    _quiet_warnings()


def _quiet_warnings() -> None:
    import warnings

    warnings.filterwarnings("ignore", message=r".*quantiz.*deprecated", category=UserWarning)
    warnings.filterwarnings("ignore", message=r".*torch\.ao\.quantization.*deprecated", category=DeprecationWarning)
