"""Where the voice encoder looks: speech regions from the transcript's words, cut into partials.

The words of a transcript (their times, seconds on the file's timeline) say where someone speaks
more precisely than an energy detector: regions are the words merged across pauses shorter than
:data:`REGION_GAP_S`. Each region is cut into *partial utterances* of :data:`PARTIAL_S` (what
the GE2E encoder was trained on) every :data:`HOP_S`; a region shorter than one partial becomes
one partial, centred on it and padded with silence (never with the neighbours' audio, which may
be another speaker's). Consecutive partials of a region, at most :data:`SEED_PARTIALS` of them,
form a *seed*: a stretch of continuous speech taken to be one voice, the unit that
:mod:`~batch_job.speakers.cluster` groups (a change of speaker inside a seed is still found word
by word, :mod:`~batch_job.speakers.labels`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from batch_job.constants import SAMPLE_RATE
from batch_job.result import Segment

PARTIAL_S = 1.6
"""One partial utterance: 160 encoder frames of 10 ms."""
HOP_S = 0.8
"""Between the starts of consecutive partials of a region (two partials overlap every instant)."""
REGION_GAP_S = 0.2
"""Words closer than this are one region (a pause within a turn; turns in a quick exchange are 0.15-0.3 s apart)."""
REGION_PAD_S = 0.1
"""Audio kept around a region's words (their times are the alignment's, to 20 ms)."""
SEED_PARTIALS = 2
"""Partials per seed at most: about 2.4 s of continuous speech (longer seeds straddle quick turn changes)."""


@dataclass(frozen=True)
class Partial:
    """One encoder input: ``[start, end)`` seconds of the file (``end - start <= PARTIAL_S``) and its seed."""

    start: float
    end: float
    seed: int


def speech_regions(segments: Sequence[Segment], duration: float) -> list[tuple[float, float]]:
    """``(start, end)`` seconds of speech: the words merged across short pauses, padded, in order.

    Segments without words (word timing failed) count as one stretch of speech each.
    """
    spans = sorted((w.start, w.end) for s in segments for w in s.words) or []
    spans += [(s.start, s.end) for s in segments if not s.words and s.end > s.start]
    spans.sort()
    regions: list[list[float]] = []
    for start, end in spans:
        if regions and start - regions[-1][1] < REGION_GAP_S:
            regions[-1][1] = max(regions[-1][1], end)
        else:
            regions.append([start, end])
    return [(max(0.0, a - REGION_PAD_S), min(duration, b + REGION_PAD_S)) for a, b in regions if b > a]


def partials(regions: Sequence[tuple[float, float]]) -> list[Partial]:
    """The partial utterances of ``regions``: every :data:`HOP_S`, the last one flush with the region's
    end, numbered into seeds of at most :data:`SEED_PARTIALS` consecutive partials of one region."""
    out: list[Partial] = []
    first_seed = 0
    for a, b in regions:
        starts = [a] if b - a <= PARTIAL_S else [*np.arange(a, b - PARTIAL_S, HOP_S), b - PARTIAL_S]
        seeds = -(-len(starts) // SEED_PARTIALS)  # evenly: 7 partials are seeds of 4 and 3, not 6 and 1
        out.extend(Partial(float(s), min(b, float(s) + PARTIAL_S), first_seed + i * seeds // len(starts))
                   for i, s in enumerate(starts))
        first_seed += seeds
    return out


def partial_audio(audio: np.ndarray, partial: Partial) -> np.ndarray:
    """``[PARTIAL_S * 16000]`` float32 samples of ``partial``, a short one centred in silence."""
    size = int(round(PARTIAL_S * SAMPLE_RATE))
    piece = audio[int(round(partial.start * SAMPLE_RATE)) : int(round(partial.end * SAMPLE_RATE))][:size]
    if len(piece) == size:
        return piece
    out = np.zeros(size, np.float32)
    at = (size - len(piece)) // 2
    out[at : at + len(piece)] = piece
    return out
