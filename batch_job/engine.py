"""The engine: a Whisper model's graphs for one device, and batch decoding over them.

Devices differ ONLY in how :class:`~batch_job.inference.EncoderGraph` and
:class:`~batch_job.inference.DecoderStepGraph` are prepared and where their cache lives:

* ``cpu``: the decoder's Linear layers dynamically quantized to int8; the encoder in bfloat16
  where the CPU multiplies it natively (``encoder_dtype``, :class:`~batch_job.inference.CastEncoder`),
  else float32 (an int8 encoder costs several WER points); fixed batch-size buckets; with ``jit_decoder`` (the
  default) both graphs are ``torch.jit.trace``-d and saved in the graph cache
  (:mod:`batch_job.graph_cache`), so later starts load them without transformers;
* ``cuda``: eager PyTorch on the GPU (the step traced per bucket on first use);
* ``neuron``: graphs compiled ahead of time by ``whisper-batch compile`` (bfloat16, caches as
  device state) and loaded from ``settings.compiled_dir`` with the side data saved next to
  them: no transformers model is built (see :mod:`batch_job.neuron.runtime`).

The decoding loop (:func:`batch_job.decoding.decode_batch`) is the same for all of them. The
engine is built from a :class:`~batch_job.graph_cache.ModelBundle` (graphs per bucket, special
tokens, text and log-mel functions, dims) that comes from the checkpoint (:func:`model_bundle`),
the graph cache or the compiled directory.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from batch_job import graph_cache
from batch_job.constants import N_SAMPLES as WINDOW_SAMPLES
from batch_job.constants import PROMPT_SLOTS, static_cache_len
from batch_job.decoding import DecodingOptions, DecodingResult, SpecialTokens, decode_batch
from batch_job.errors import ModelError
from batch_job.graph_cache import BucketGraphs, MelFrontend, ModelBundle, ModelDims, TokenizerText
from batch_job.settings import Settings, usable_cores

log = logging.getLogger(__name__)



def batch_buckets(max_batch: int) -> tuple[int, ...]:
    """Batch sizes the CPU/CUDA engine keeps graphs for: every size from 1 to ``max_batch``.

    A batch of ``n`` windows runs on the bucket of size ``n`` exactly, so a job whose file has
    five windows does not pay the encoder for three padding rows. (Each bucket is one more traced
    method in the graph cache, sharing the weights; Neuron compiles only the sizes it is asked
    for, since each costs a compilation and device memory.)
    """
    if max_batch < 1:
        raise ValueError(f"batch size must be at least 1, got {max_batch}")
    return tuple(range(1, max_batch + 1))


def resolve_device(requested: str) -> str:
    """``auto`` -> ``neuron`` when torch-neuronx and a NeuronCore are present, else ``cuda``, else ``cpu``."""
    import torch

    if requested != "auto":
        if requested == "cuda" and not torch.cuda.is_available():
            raise ModelError("--device cuda requested but CUDA is not available")
        if requested not in ("cpu", "cuda", "neuron"):
            raise ModelError(f"unknown device {requested!r}: use auto, cpu, cuda or neuron")
        return requested
    from batch_job.neuron.runtime import neuron_available

    if neuron_available():
        return "neuron"
    return "cuda" if torch.cuda.is_available() else "cpu"


class LazyTracedStep:
    """A decoder step that is ``torch.jit.trace``-d on its first call, with that call's real inputs.

    The step is pure, so tracing on the first call's inputs and returning the traced graph's
    outputs is exactly one step; every later call skips Python dispatch. Same module, same math
    as the eager step.
    Used on CUDA; on CPU every bucket is traced up front (:func:`batch_job.graph_cache.trace_cpu_graphs`)
    so the graphs can be cached.
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


ENCODER_DTYPES = ("auto", "float32", "bfloat16")


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


def uses_graph_cache(settings: Settings, device: str) -> bool:
    """CPU with the traced decoder: the graphs are traced up front and cached (:mod:`batch_job.graph_cache`)."""
    return device == "cpu" and bool(settings.jit_decoder)


def model_bundle(loaded, settings: Settings, device: str) -> ModelBundle:
    """Build the engine's bundle from a transformers checkpoint (the cold path; CPU and CUDA).

    * ``cpu`` + ``jit_decoder``: encoder traced at batch 1 (batch-generic), step quantized to int8
      (``quantize_decoder``) and traced once per bucket; these are what the graph cache saves;
    * otherwise eager modules (the step traced lazily per bucket on CUDA with ``jit_decoder``).

    ``neuron`` never builds from the checkpoint: its bundle is the compiled directory's
    (:func:`batch_job.neuron.runtime.load_bundle`), whatever ``loaded`` is.
    """
    if device == "neuron":
        from batch_job.neuron.runtime import load_bundle

        return load_bundle(settings)
    import torch

    from batch_job.inference import CastEncoder, DecoderStepGraph, EncoderGraph, StackedCacheStep

    config = loaded.model.config
    dims = ModelDims.from_config(config, static_cache_len(config.max_target_positions, settings.max_new_tokens))
    torch_device = torch.device("cuda" if device == "cuda" else "cpu")
    model = loaded.model.to(torch_device, dtype=torch.float32).eval()
    encoder = EncoderGraph(model).eval()
    step = StackedCacheStep(DecoderStepGraph(model)).eval()
    extra: dict = {}
    sizes = batch_buckets(settings.batch_size)
    if device == "cpu" and settings.quantize_decoder:
        step = torch.ao.quantization.quantize_dynamic(step, {torch.nn.Linear}, dtype=torch.qint8)
    if device == "cpu" and cpu_encoder_dtype(settings) == "bfloat16":
        encoder = CastEncoder(encoder, torch.bfloat16).eval()
    if uses_graph_cache(settings, device):
        encoder_script, step_script = graph_cache.trace_cpu_graphs(encoder, step, dims, sizes, loaded.sot)
        graphs = graph_cache.bucket_graphs(encoder_script, step_script, sizes)
        extra = {"encoder_script": encoder_script, "step_script": step_script}
    elif settings.jit_decoder:
        # One traced step graph per bucket (shapes differ), traced on first use.
        graphs = {b: BucketGraphs(encoder, LazyTracedStep(step)) for b in sizes}
    else:
        graphs = {b: BucketGraphs(encoder, step) for b in sizes}
    tokenizer = loaded.tokenizer
    return ModelBundle(
        name=loaded.name,
        checksum=loaded.checksum,
        tokens=special_tokens(loaded),
        dims=dims,
        text=TokenizerText(tokenizer.backend_tokenizer, bool(getattr(tokenizer, "clean_up_tokenization_spaces", False))),
        mel=MelFrontend.from_feature_extractor(loaded.feature_extractor),
        graphs=graphs,
        loaded=loaded,
        extra=extra,
    )


class Engine:
    """Per-bucket static-cache inference over a :class:`~batch_job.graph_cache.ModelBundle`. Build with :meth:`load`.

    ``source`` is a bundle (from the graph cache or :func:`model_bundle`) or a
    :class:`~batch_job.models.LoadedModel` (built into a bundle here, nothing cached).
    """

    def __init__(self, source, settings: Settings, device: str, load_seconds: float) -> None:
        import torch

        from batch_job.inference import CacheShape

        bundle = source if isinstance(source, ModelBundle) else model_bundle(source, settings, device)
        self.bundle = bundle
        self._loaded = bundle.loaded
        self.settings = settings
        self.device = device
        self.model_name = bundle.name
        self.tokens = bundle.tokens
        self.dims = bundle.dims
        self.cache_len = bundle.dims.cache_len
        self.max_new_tokens = self.cache_len - PROMPT_SLOTS
        torch_device = torch.device("cuda" if device == "cuda" else "cpu")
        self.buckets = tuple(sorted(bundle.graphs))
        self.max_batch = max(self.buckets)
        dims = bundle.dims
        self._inference = {
            b: bundle.graphs[b].inference(CacheShape(dims.layers, b, dims.heads, self.cache_len, dims.head_dim),
                                          device=torch_device)
            for b in self.buckets
        }
        self.load_seconds = load_seconds

    @property
    def loaded(self):
        """The transformers :class:`~batch_job.models.LoadedModel` (loaded on first access after a cache hit)."""
        if self._loaded is None:
            from batch_job.models import load_model

            _quiet_libraries()
            self._loaded = load_model(self.settings.model, cache_dir=self.settings.cache_dir)
        return self._loaded

    @classmethod
    def load(cls, settings: Settings) -> Engine:
        """Load ``settings.model`` for ``settings.device``; raises ModelError with a clear reason.

        On CPU with ``jit_decoder`` the graphs come from the graph cache when present (no
        transformers import, no quantization, no tracing); otherwise they are built from the
        checkpoint and saved there for the next start.
        """
        t0 = time.perf_counter()
        import torch

        _quiet_warnings()
        bound_heap_growth()
        threads = settings.threads or usable_cores()
        torch.set_num_threads(threads)
        device = resolve_device(settings.device)
        bundle = None
        cached = _CacheSlot.for_settings(settings) if uses_graph_cache(settings, device) else None
        if cached is not None:
            bundle = graph_cache.load(cached.root, cached.key, buckets=cached.buckets, model_name=settings.model)
        if bundle is None and device == "neuron":
            from batch_job.neuron.runtime import load_bundle

            bundle = load_bundle(settings)  # the compiled graphs and their side data: no eager model
        if bundle is None:
            from batch_job.models import load_model

            _quiet_libraries()
            try:
                loaded = load_model(settings.model, cache_dir=settings.cache_dir)
                bundle = model_bundle(loaded, settings, device)
            except ModelError:
                raise
            except Exception as exc:  # corrupt checkpoint, wrong architecture, ...
                raise ModelError(f"cannot load model {settings.model!r}: {exc}") from exc
            if cached is not None and "step_script" in bundle.extra:
                cached.save(bundle, settings)
        engine = cls(bundle, settings, device, 0.0)
        engine.load_seconds = time.perf_counter() - t0
        log.info(
            "model %s ready on %s in %.2f s (buckets %s, %s)", engine.model_name, device, engine.load_seconds,
            engine.buckets, _SOURCES.get(bundle.source, bundle.source),
        )
        return engine

    def check_language(self, language: str) -> str:
        """Validate a language code for this model (English-only models accept only ``en``)."""
        code = language.lower()
        if not self.tokens.is_multilingual:
            if code != "en":
                raise ValueError(f"model {self.model_name} is English-only; --language {language} is not supported")
            return code
        if code not in self.tokens.languages:
            raise ValueError(f"unknown language {language!r}; known: {', '.join(sorted(self.tokens.languages))}")
        return code

    def text(self, tokens: Sequence[int]) -> str:
        """Text of the non-special tokens (timestamps and specials removed)."""
        eot = self.tokens.eot
        return self.bundle.text([t for t in tokens if t < eot])

    def log_mel(self, rows: Sequence[np.ndarray], batch: int):
        """``rows`` of <= 30 s audio -> log-mel ``[batch, n_mels, 3000]`` (rows past ``len(rows)`` are silence)."""
        padded = np.zeros((batch, WINDOW_SAMPLES), dtype=np.float32)
        for i, row in enumerate(rows):
            n = min(len(row), WINDOW_SAMPLES)
            padded[i, :n] = row[:n]
        return self.bundle.mel(padded)

    def decode(
        self, rows: Sequence[np.ndarray], options: DecodingOptions, *, temperatures: Sequence[float] | None = None
    ) -> tuple[list[DecodingResult], dict[str, float]]:
        """Decode up to ``max_batch`` windows in one fixed-shape batch. Returns results and stage timings."""
        import torch

        n = len(rows)
        batch = next(b for b in self.buckets if b >= n)
        inference = self._inference[batch]
        t0 = time.perf_counter()
        mel = self.log_mel(rows, batch)
        t1 = time.perf_counter()
        with torch.inference_mode():
            inference.start(mel)
            t2 = time.perf_counter()
            try:
                results = decode_batch(
                    inference, self.tokens, options, n_rows=n, batch_size=batch, temperatures=temperatures
                )
            finally:
                # Each bucket would otherwise keep its last batch's encoder output alive: with
                # buckets 1..8 that is up to 36 rows of cross K/V (~1.3 GB for tiny.en).
                inference.finish()
        t3 = time.perf_counter()
        return results, {"features": t1 - t0, "encode": t2 - t1, "decode": t3 - t2}


_SOURCES = {"cache": "graph cache", "model": "built from the checkpoint", "compiled": "compiled graphs"}


def special_tokens(loaded) -> SpecialTokens:
    """The decoding loop's token ids, from a :class:`~batch_job.models.LoadedModel` and its generation config."""
    config = loaded.model.generation_config
    suppress = tuple(int(t) for t in (getattr(config, "suppress_tokens", None) or []))
    begin = tuple(int(t) for t in (getattr(config, "begin_suppress_tokens", None) or [loaded.eot]))
    multilingual = bool(loaded.is_multilingual)
    return SpecialTokens(
        sot=loaded.sot,
        eot=loaded.eot,
        no_timestamps=loaded.no_timestamps,
        timestamp_begin=loaded.timestamp_begin,
        no_speech=loaded.no_speech,
        transcribe=loaded.transcribe if multilingual else None,
        translate=loaded.translate if multilingual else None,
        languages=dict(loaded.language_ids) if multilingual else {},
        suppress=suppress,
        begin_suppress=begin,
    )


MMAP_THRESHOLD_BYTES = 16 * 1024 * 1024


def bound_heap_growth(threshold: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Keep the encoder's large transient buffers out of glibc's heap (Linux/glibc only).

    glibc raises its mmap threshold after large blocks are freed, so the encoder's 18-74 MB
    activations end up on the heap and are never returned: peak RSS for a 1-hour file grew
    to ~2 GB. Fixing the threshold (``mallopt``; same as ``MALLOC_MMAP_THRESHOLD_``) makes
    allocations of >= 16 MB mmapped and returned on free (~1.1 GB peak on 300 s instead of
    ~2 GB), at the cost of page faults on those buffers. Returns True when applied.
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


@dataclass(frozen=True)
class _CacheSlot:
    """Where this engine's CPU graphs live in the graph cache (key computed without loading the model)."""

    root: Path
    key: str
    buckets: tuple[int, ...]
    broken: bool

    @classmethod
    def for_settings(cls, settings: Settings) -> _CacheSlot | None:
        from batch_job.models import resolve_checkpoint, weights_checksum

        try:
            checkpoint = resolve_checkpoint(settings.model, settings.cache_dir)
            checksum = weights_checksum(checkpoint)
            max_positions = graph_cache.checkpoint_max_positions(checkpoint)
        except Exception as exc:  # noqa: BLE001 - the cold path reports model errors properly
            log.debug("graph cache: no key for %s (%s)", settings.model, exc)
            return None
        buckets = batch_buckets(settings.batch_size)
        key = graph_cache.cache_key(_key_fields(settings, checksum, static_cache_len(max_positions, settings.max_new_tokens), buckets))
        root = graph_cache.cache_root(settings.cache_dir)
        return cls(root, key, buckets, (root / key).exists())

    def save(self, bundle: ModelBundle, settings: Settings) -> None:
        fields = _key_fields(settings, bundle.checksum, bundle.dims.cache_len, self.buckets)
        key = graph_cache.cache_key(fields)
        loaded = bundle.loaded
        graph_cache.save(
            self.root,
            key,
            fields,
            encoder=bundle.extra["encoder_script"],
            steps=bundle.extra["step_script"],
            tokens=bundle.tokens,
            dims=bundle.dims,
            mel=bundle.mel,
            tokenizer_json=loaded.tokenizer.backend_tokenizer.to_str(),
            clean_up_spaces=bundle.text.clean_up_spaces,
            model_name=bundle.name,
            replace_broken=self.broken and key == self.key,
        )


def _key_fields(settings: Settings, checksum: str, cache_len: int, buckets: Sequence[int]) -> dict:
    return graph_cache.key_fields(
        checksum=checksum, cache_len=cache_len, buckets=buckets, quantize=settings.quantize_decoder, jit=settings.jit_decoder,
        encoder_dtype=cpu_encoder_dtype(settings),
    )
