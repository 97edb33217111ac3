"""The special token ids of one Whisper tokenizer: the one shape every part of the engine uses.

Produced once, by :func:`batch_job.engine.models.load_model` from the tokenizer and generation
config (``LoadedModel.tokens``); saved next to cached and compiled graphs as JSON
(:meth:`SpecialTokens.to_json`) so warm starts need no transformers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class SpecialTokens:
    """Token ids of one tokenizer (tiny.en's are one lower than the multilingual models').

    ``languages`` is empty for English-only models; their prompt is ``<|sot|>`` alone (the
    ``transcribe``/``translate`` ids exist in their vocabulary but are never used).
    """

    sot: int
    eot: int
    no_timestamps: int
    timestamp_begin: int
    no_speech: int | None
    transcribe: int | None
    translate: int | None
    languages: dict[str, int] = field(default_factory=dict)
    """Language code (``"en"``, ``"de"``) -> token id."""
    suppress: tuple[int, ...] = ()
    """Ids never sampled (non-speech symbols), from the generation config."""
    begin_suppress: tuple[int, ...] = ()
    """Ids not allowed as the first text token (blank, ``<|endoftext|>``)."""

    @property
    def is_multilingual(self) -> bool:
        return bool(self.languages)

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["suppress"] = list(self.suppress)
        out["begin_suppress"] = list(self.begin_suppress)
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SpecialTokens:
        values = dict(data)
        values["languages"] = {str(k): int(v) for k, v in (values.get("languages") or {}).items()}
        values["suppress"] = tuple(int(t) for t in values.get("suppress") or ())
        values["begin_suppress"] = tuple(int(t) for t in values.get("begin_suppress") or ())
        return cls(**values)
