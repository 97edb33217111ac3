"""The engine: a loaded Whisper checkpoint, its graphs for one device, and batch decoding.

Devices differ ONLY in how :class:`~batch_job.inference.EncoderGraph` and
:class:`~batch_job.inference.DecoderStepGraph` are prepared:

* ``cpu``: eager PyTorch, the decoder's Linear layers dynamically quantized to int8 (the encoder
  stays fp32: an int8 encoder costs several WER points), fixed batch-size buckets;
* ``cuda``: eager PyTorch on the GPU;
* ``neuron``: graphs compiled ahead of time by ``whisper-batch compile`` and loaded from
  ``settings.compiled_dir`` (see :mod:`batch_job.neuron`).

The decoding loop (:func:`batch_job.decoding.decode_batch`) is the same for all of them.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from batch_job.decoding import DecodingOptions, DecodingResult, SpecialTokens, decode_batch
from batch_job.errors import ModelError
from batch_job.settings import Settings

log = logging.getLogger(__name__)

WINDOW_SAMPLES = 480_000  # 30 s at 16 kHz
PROMPT_SLOTS = 4  # <|sot|> <|lang|> <|task|> (+ <|notimestamps|>)


def batch_buckets(max_batch: int) -> tuple[int, ...]:
    """Batch sizes the engine keeps graphs for: powers of two below ``max_batch``, and ``max_batch``.

    A batch of ``n`` windows runs on the smallest bucket >= n, so a short file on CPU does not pay
    the encoder for ``max_batch - n`` padding rows.
    """
    sizes = {max_batch}
    b = 1
    while b < max_batch:
        sizes.add(b)
        b *= 2
    return tuple(sorted(sizes))


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


@dataclass(frozen=True)
class _Graphs:
    encode: object
    step: object


class LazyTracedStep:
    """A decoder step that is ``torch.jit.trace``-d on its first call, with that call's real inputs.

    Tracing runs the step once (its in-place cache write at ``position`` is exactly the write
    the traced graph then repeats), so the first call returns the traced graph's outputs and
    every later call skips Python dispatch. Same module, same math as the eager step.
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


class Engine:
    """Loaded model + per-bucket static-cache inference. Build with :meth:`load`."""

    def __init__(self, loaded, settings: Settings, device: str, load_seconds: float) -> None:
        import torch

        from batch_job.inference import CacheShape, DecoderStepGraph, EncoderGraph, StaticCacheInference

        self.loaded = loaded
        self.settings = settings
        self.device = device
        self.model_name = loaded.name
        self.tokenizer = loaded.tokenizer
        self.feature_extractor = loaded.feature_extractor
        self.tokens = special_tokens(loaded)
        self.max_new_tokens = settings.max_new_tokens
        config = loaded.model.config
        self.cache_len = min(config.max_target_positions, self.max_new_tokens + PROMPT_SLOTS)
        self.max_new_tokens = self.cache_len - PROMPT_SLOTS
        torch_device = torch.device("cuda" if device == "cuda" else "cpu")
        model = loaded.model.to(torch_device, dtype=torch.float32).eval()
        encoder = EncoderGraph(model).eval()
        step = DecoderStepGraph(model).eval()
        if device == "neuron":
            from batch_job.neuron.runtime import load_compiled

            compiled = load_compiled(settings.compiled_dir, loaded, cache_len=self.cache_len)
            sizes = tuple(sorted(compiled))
        else:
            if device == "cpu" and settings.quantize_decoder:
                step = torch.ao.quantization.quantize_dynamic(step, {torch.nn.Linear}, dtype=torch.qint8)
            sizes = batch_buckets(settings.batch_size)
            if settings.jit_decoder:
                # One traced step graph per bucket (shapes differ), traced on first use so
                # start-up stays fast; removes Python dispatch from every decoder step.
                compiled = {b: _Graphs(encoder, LazyTracedStep(step)) for b in sizes}
            else:
                compiled = {b: _Graphs(encoder, step) for b in sizes}
        self.buckets = sizes
        self.max_batch = max(sizes)
        heads = config.decoder_attention_heads
        self._inference = {
            b: StaticCacheInference(
                compiled[b].encode,
                compiled[b].step,
                CacheShape(config.decoder_layers, b, heads, self.cache_len, config.d_model // heads),
                device=torch_device,
                dtype=torch.float32,
            )
            for b in sizes
        }
        self.load_seconds = load_seconds

    @classmethod
    def load(cls, settings: Settings) -> "Engine":
        """Load ``settings.model`` for ``settings.device``; raises ModelError with a clear reason."""
        t0 = time.perf_counter()
        import torch

        from batch_job.models import load_model

        _quiet_libraries()
        threads = settings.threads or _cores()
        torch.set_num_threads(threads)
        device = resolve_device(settings.device)
        try:
            loaded = load_model(settings.model, cache_dir=settings.cache_dir)
        except ModelError:
            raise
        except Exception as exc:  # corrupt checkpoint, wrong architecture, ...
            raise ModelError(f"cannot load model {settings.model!r}: {exc}") from exc
        engine = cls(loaded, settings, device, 0.0)
        engine.load_seconds = time.perf_counter() - t0
        log.info("model %s ready on %s in %.2f s (buckets %s)", engine.model_name, device, engine.load_seconds, engine.buckets)
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
        return self.tokenizer.decode([t for t in tokens if t < eot], skip_special_tokens=True)

    def log_mel(self, rows: Sequence[np.ndarray], batch: int):
        """``rows`` of <= 30 s audio -> log-mel ``[batch, n_mels, 3000]`` (rows past ``len(rows)`` are silence)."""
        import torch

        padded = np.zeros((batch, WINDOW_SAMPLES), dtype=np.float32)
        for i, row in enumerate(rows):
            n = min(len(row), WINDOW_SAMPLES)
            padded[i, :n] = row[:n]
        mel = self.feature_extractor._torch_extract_fbank_features(padded, "cpu")
        return torch.from_numpy(mel)

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
            results = decode_batch(
                inference, self.tokens, options, n_rows=n, batch_size=batch, temperatures=temperatures
            )
        t3 = time.perf_counter()
        return results, {"features": t1 - t0, "encode": t2 - t1, "decode": t3 - t2}


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


def _quiet_libraries() -> None:
    """No weight-loading progress bars or deprecation chatter in job logs and CLI output."""
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", message=r".*quantiz.*deprecated", category=UserWarning)
    warnings.filterwarnings("ignore", message=r".*torch\.ao\.quantization.*deprecated", category=DeprecationWarning)


def _cores() -> int:
    from batch_job.transcribe import default_threads

    return default_threads()
