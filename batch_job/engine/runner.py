"""The engine: one model's graphs per batch bucket, and batch decoding over them.

An :class:`Engine` is built from a :class:`~batch_job.engine.bundle.ModelBundle` and nothing
else; how the bundle was made (checkpoint, graph cache, compiled Neuron graphs) is
:mod:`batch_job.engine.loading`'s business. The decoding loop
(:func:`batch_job.engine.decoding.decode_batch`) is the same for every device.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np

from batch_job.constants import N_SAMPLES, PROMPT_SLOTS
from batch_job.engine.bundle import ModelBundle
from batch_job.engine.decoding import DecodingOptions, DecodingResult, decode_batch, token_budget


class Engine:
    """Per-bucket static-cache inference over a :class:`~batch_job.engine.bundle.ModelBundle`.

    Load one with :func:`batch_job.engine.loading.load_engine`.
    """

    def __init__(self, bundle: ModelBundle) -> None:
        import torch

        from batch_job.engine.graphs import CacheShape, StaticCacheInference

        self.bundle = bundle
        self.device = bundle.device
        self.model_name = bundle.name
        self.tokens = bundle.tokens
        self.dims = bundle.dims
        self.cache_len = bundle.dims.cache_len
        self.max_new_tokens = self.cache_len - PROMPT_SLOTS
        self.buckets = tuple(sorted(bundle.graphs))
        self.max_batch = max(self.buckets)
        torch_device = torch.device("cuda" if bundle.device == "cuda" else "cpu")
        dims = bundle.dims
        self._inference = {
            b: bundle.graphs[b].inference(CacheShape(dims.layers, b, dims.heads, self.cache_len, dims.head_dim),
                                          device=torch_device, alignment_heads=len(bundle.alignment_heads))
            for b in self.buckets
        }
        self.moves_rows = all(isinstance(i, StaticCacheInference) for i in self._inference.values())
        """Whether a batch's rows can move between buckets (CPU/CUDA: the caches are host tensors
        that :meth:`~batch_job.engine.graphs.StaticCacheInference.move_rows` copies; Neuron's live
        on the device, in graphs compiled for one batch size each)."""
        self.shrinks = self.moves_rows
        """Whether a batch moves to a smaller bucket as its rows finish (only where rows move)."""
        self._optimize_steps = bundle.device != "cpu"
        """TorchScript's graph executor profiles and re-optimizes a graph on its first calls at each
        batch size. For the CPU decoder step that bought nothing in steady state and cost every
        bucket's first batches in every process (one Batch job is one process; shrinking batches
        visit every bucket), so CPU steps run unoptimized. The encoder stays optimized: unoptimized
        it peaks ~300 MB higher at batch 8 (docs/benchmarks.md, "Where the time goes: the long
        file and the fallbacks")."""
        self.token_budgets = True
        """Whether a row stops at :func:`~batch_job.engine.decoding.token_budget` of its audio (else at ``max_new_tokens``)."""

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
        padded = np.zeros((batch, N_SAMPLES), dtype=np.float32)
        for i, row in enumerate(rows):
            n = min(len(row), N_SAMPLES)
            padded[i, :n] = row[:n]
        return self.bundle.mel(padded)

    def decode(
        self, rows: Sequence[np.ndarray], options: DecodingOptions, *, temperatures: Sequence[float] | None = None
    ) -> tuple[list[DecodingResult], dict[str, float]]:
        """Decode up to ``max_batch`` windows in one fixed-shape batch. Returns results and stage timings.

        Rows that are the same array object (one window at several temperatures) are encoded once
        where rows can move between buckets and no word-timestamp record is kept: the distinct
        rows run the encoder in their own smaller bucket and are copied out to the batch's rows.
        """
        import torch

        n = len(rows)
        batch = next(b for b in self.buckets if b >= n)
        inference = self._inference[batch]
        distinct, index = _distinct_rows(rows)
        encoded = next(b for b in self.buckets if b >= len(distinct))
        spread = self.moves_rows and not self.bundle.alignment_heads and encoded < batch
        t0 = time.perf_counter()
        mel = self.log_mel(distinct, encoded) if spread else self.log_mel(rows, batch)
        t1 = time.perf_counter()
        current = [inference]

        def shrink(keep: torch.Tensor):
            """The bucket of exactly ``len(keep)`` rows, holding them (``None``: there is none)."""
            target = self._inference.get(len(keep))
            if target is None or target is current[-1]:
                return None
            current.append(current[-1].move_rows(keep, target))
            return target

        with torch.inference_mode():
            if spread:
                source = self._inference[encoded]
                source.start(mel)
                padding = [0] * (batch - n)  # padding rows start finished: any encoded row will do
                source.move_rows(torch.tensor(index + padding, dtype=torch.long), inference)
            else:
                inference.start(mel)
            t2 = time.perf_counter()
            try:
                with torch.jit.optimized_execution(self._optimize_steps):
                    results = decode_batch(
                        inference, self.tokens, options, n_rows=n, batch_size=batch, temperatures=temperatures,
                        alignment=inference.alignment,
                        shrink=shrink if self.shrinks else None,
                        max_tokens=[token_budget(len(row), options.max_new_tokens) for row in rows] if self.token_budgets else None,
                    )
            finally:
                # Each bucket would otherwise keep its last batch's encoder output alive: with
                # buckets 1..8 that is up to 36 rows of cross K/V (~1.3 GB for tiny.en).
                current[-1].finish()
        t3 = time.perf_counter()
        return results, {"features": t1 - t0, "encode": t2 - t1, "decode": t3 - t2}


def _distinct_rows(rows: Sequence[np.ndarray]) -> tuple[list[np.ndarray], list[int]]:
    """The distinct arrays of ``rows`` (by identity, in first-seen order) and each row's index among them."""
    first: dict[int, int] = {}
    distinct: list[np.ndarray] = []
    index: list[int] = []
    for row in rows:
        k = first.setdefault(id(row), len(distinct))
        if k == len(distinct):
            distinct.append(row)
        index.append(k)
    return distinct, index
