"""A loaded transformers Whisper checkpoint, as plain data: :class:`LoadedModel` and its alignment heads.

Plain types shared across the engine: :mod:`batch_job.engine.models` makes a ``LoadedModel``,
:mod:`batch_job.engine.bundle` may keep one (a bundle built from the checkpoint), and
:mod:`batch_job.engine.artifacts` saves and reads the alignment heads next to traced graphs. They
live here, below all three and importing nothing of the engine but :mod:`~batch_job.engine.tokens`,
so that those modules import downwards only (``bundle`` used to import ``models`` for
``LoadedModel`` while ``models`` imported ``bundle`` for the heads). torch and transformers are
named for type checkers only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from batch_job.engine.tokens import SpecialTokens

if TYPE_CHECKING:  # pragma: no cover
    from transformers import WhisperFeatureExtractor, WhisperForConditionalGeneration, WhisperTokenizerFast

AlignmentHeads = tuple[tuple[int, int], ...]
"""``(layer, head)`` cross-attention heads that track the audio (word timestamps)."""


def alignment_heads_from(raw: Any) -> AlignmentHeads:
    """``[[layer, head], ...]`` (a generation config's or a saved manifest's) as int pairs; ``()`` for
    ``None`` or empty; ``ValueError`` when it is not a list of pairs."""
    try:
        return tuple((int(layer), int(head)) for layer, head in raw or ())
    except (TypeError, ValueError) as exc:
        raise ValueError(f"alignment_heads {raw!r} is not a list of [layer, head] pairs") from exc


@dataclass(frozen=True)
class LoadedModel:
    """A Whisper model ready for inference, with the token ids the decoding loop needs.

    ``model`` takes ``input_features`` of shape ``[batch, n_mels, 3000]`` (30 s of 16 kHz audio,
    hop 160) and encodes them to ``[batch, 1500, d_model]``; logits are ``[batch, tokens, vocab]``.
    Timestamp token ``timestamp_begin + i`` means ``i * 0.02`` s, up to ``<|30.00|>``
    (``i = 1500``).
    """

    model: WhisperForConditionalGeneration
    tokenizer: WhisperTokenizerFast
    feature_extractor: WhisperFeatureExtractor
    name: str
    path: Path
    checksum: str
    """sha256 of the weights file (combined over shards when sharded)."""
    n_mels: int
    tokens: SpecialTokens
    """Special token ids (checked against the vocabulary) and the generation config's suppress lists."""
    alignment_heads: AlignmentHeads = ()
    """``(layer, head)`` cross-attention heads that track the audio (generation config); word timestamps need them."""
