"""What an engine is made of: the pieces every loader produces and the runner consumes.

A :class:`ModelBundle` holds one model's graphs per batch bucket (:class:`BucketGraphs` traced for
CPU/CUDA, :class:`StatefulGraphs` from ``whisper-batch compile``) plus the side data decoding
needs (special tokens, dims, the log-mel front end, the detokenizer), whether it was built from a
transformers checkpoint, read from the CPU graph cache or from ``whisper-batch compile``'s
directory. Nothing here loads anything: see :mod:`batch_job.engine.loading`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from batch_job.engine.loaded_model import AlignmentHeads, LoadedModel
from batch_job.engine.tokens import SpecialTokens

if TYPE_CHECKING:  # pragma: no cover - torch and the loaders are imported only where used
    from batch_job.engine.graphs import CacheShape, StaticCacheInference

Device = Literal["cpu", "cuda", "neuron"]


@dataclass(frozen=True)
class ModelDims:
    """Shapes the engine needs (no transformers config object on the warm path)."""

    layers: int
    heads: int
    d_model: int
    n_mels: int
    vocab_size: int
    max_target_positions: int
    cache_len: int

    @property
    def head_dim(self) -> int:
        return self.d_model // self.heads

    @classmethod
    def from_config(cls, config: Any, cache_len: int) -> ModelDims:
        """From a transformers ``WhisperConfig`` and the static cache length."""
        return cls(
            layers=int(config.decoder_layers),
            heads=int(config.decoder_attention_heads),
            d_model=int(config.d_model),
            n_mels=int(config.num_mel_bins),
            vocab_size=int(config.vocab_size),
            max_target_positions=int(config.max_target_positions),
            cache_len=int(cache_len),
        )


class MelFrontend:
    """Log-mel features, the same computation as ``WhisperFeatureExtractor._torch_extract_fbank_features``.

    ``__call__(padded [B, N] float32) -> torch.Tensor [B, n_mels, N // hop]``.
    """

    def __init__(self, filters: np.ndarray, n_fft: int, hop_length: int, dither: float = 0.0) -> None:
        self.filters = np.ascontiguousarray(filters, dtype=np.float32)
        self.n_fft = int(n_fft)
        self.hop_length = int(hop_length)
        self.dither = float(dither)
        self._filters_t = None
        self._window = None

    @classmethod
    def from_feature_extractor(cls, fe: Any) -> MelFrontend:
        return cls(np.asarray(fe.mel_filters), fe.n_fft, fe.hop_length, float(getattr(fe, "dither", 0.0) or 0.0))

    def __call__(self, padded: np.ndarray):
        import torch

        if self._filters_t is None:
            self._filters_t = torch.from_numpy(self.filters).T
            self._window = torch.hann_window(self.n_fft)
        waveform = torch.from_numpy(padded).to(torch.float32)
        if self.dither != 0.0:
            waveform = waveform + self.dither * torch.randn(waveform.shape, dtype=waveform.dtype)
        stft = torch.stft(waveform, self.n_fft, self.hop_length, window=self._window, return_complex=True)
        magnitudes = (stft[..., :-1].abs() ** 2).contiguous()
        mel_spec = self._filters_t @ magnitudes
        log_spec = torch.clamp(mel_spec, min=1e-10).log10()
        if waveform.dim() == 2:
            max_val = log_spec.max(dim=2, keepdim=True)[0].max(dim=1, keepdim=True)[0]
            log_spec = torch.maximum(log_spec, max_val - 8.0)
        else:
            log_spec = torch.maximum(log_spec, log_spec.max() - 8.0)
        return (log_spec + 4.0) / 4.0


class TokenizerText:
    """Token ids -> text with the ``tokenizers`` library (what ``WhisperTokenizerFast.decode`` runs).

    Callers pass text ids only (below ``<|endoftext|>``); special tokens are skipped anyway.
    """

    def __init__(self, tokenizer: Any, clean_up_spaces: bool = False) -> None:
        self.tokenizer = tokenizer
        self.clean_up_spaces = bool(clean_up_spaces)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], clean_up_spaces: bool = False) -> TokenizerText:
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_file(str(path)), clean_up_spaces)

    def to_json(self) -> str:
        """The tokenizer in ``tokenizers``' own JSON format (what :meth:`from_file` reads)."""
        return self.tokenizer.to_str()

    def __call__(self, ids: Sequence[int]) -> str:
        text = self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)
        if self.clean_up_spaces:  # transformers' clean_up_tokenization
            for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                         (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
                text = text.replace(a, b)
        return text


@dataclass(frozen=True)
class BucketGraphs:
    """One batch bucket's CPU/CUDA graphs: ``encode`` and a :class:`~batch_job.engine.graphs.StackedCacheStep`."""

    encode: Callable
    step: Callable

    def inference(self, shape: CacheShape, *, device: Any, alignment_heads: int = 0) -> StaticCacheInference:
        """A :class:`~batch_job.engine.graphs.StaticCacheInference` over these graphs (float32 caches)."""
        import torch

        from batch_job.engine.graphs import StaticCacheInference

        return StaticCacheInference(self.encode, self.step, shape, device=device, dtype=torch.float32,
                                    alignment_heads=alignment_heads)


@dataclass(frozen=True)
class StatefulGraphs:
    """One bucket's compiled encoder and stateful step (:class:`~batch_job.engine.graphs.StatefulDecoderStep`).

    ``states`` are the step's state tensors in :data:`~batch_job.engine.graphs.STATE_KINDS` order,
    as the compiled module holds them (``step.states``; on Neuron: on the device).
    """

    encode: Callable
    step: Callable
    states: tuple
    dtype: Any
    emulate_aliases: bool

    def inference(self, shape: Any, *, device: Any = None, alignment_heads: int = 0) -> Any:
        from batch_job.engine.graphs import StatefulInference

        return StatefulInference(self.encode, self.step, self.states, shape, dtype=self.dtype,
                                 emulate_aliases=self.emulate_aliases, alignment_heads=alignment_heads)


@dataclass(frozen=True)
class TracedCpuGraphs:
    """The CPU graphs as ``torch.jit`` scripts, in the form the graph cache saves them.

    ``encoder`` is traced at batch 1 (batch-generic); ``steps`` has one method ``b<B>`` per bucket.
    """

    encoder: Any
    steps: Any


BundleSource = Literal["model", "cache", "compiled"]
"""Where a bundle came from: built from the checkpoint, the CPU graph cache, or ``whisper-batch compile``."""


@dataclass(frozen=True)
class ModelBundle:
    """Everything :class:`~batch_job.engine.runner.Engine` is built from, whichever way it was loaded."""

    name: str
    checksum: str
    device: Device
    tokens: SpecialTokens
    dims: ModelDims
    text: TokenizerText
    mel: MelFrontend
    graphs: Mapping[int, BucketGraphs | StatefulGraphs]
    """Per batch size; each makes its bucket's inference with ``.inference(shape, device=..., alignment_heads=...)``."""
    alignment_heads: AlignmentHeads = ()
    """``(layer, head)`` pairs whose cross-attention the step graphs return (word timestamps); empty = none."""
    source: BundleSource = "model"
    loaded: LoadedModel | None = None
    """The transformers model when built from the checkpoint; ``None`` from the cache or compiled graphs."""
    traced: TracedCpuGraphs | None = None
    """The traced CPU graphs, when built cold for the graph cache (what it saves)."""
    cache_path: Path | None = None
    """The graph-cache entry or compiled directory the graphs were read from."""


def checkpoint_parts(loaded: LoadedModel) -> tuple[MelFrontend, TokenizerText]:
    """The log-mel front end and detokenizer of a transformers checkpoint (cold path, compile)."""
    tokenizer = loaded.tokenizer
    text = TokenizerText(tokenizer.backend_tokenizer, bool(getattr(tokenizer, "clean_up_tokenization_spaces", False)))
    return MelFrontend.from_feature_extractor(loaded.feature_extractor), text


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
