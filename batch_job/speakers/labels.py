"""Speakers onto a transcript: each word gets the speaker its voice is nearest, segments split at changes.

A word's voice is the mean of the embeddings of the partials that overlap it, weighted by the
overlap, compared with each speaker's centre (cosine). A run of at most :data:`MAX_FLIP_WORDS`
words shorter than :data:`MIN_TURN_S`, between two runs of the same other speaker, is taken as
noise of the estimate (a 1.6 s partial straddles the boundary) and given to that speaker. A
segment whose words change speaker is split at the word where it changes; labels are
``SPEAKER_00``, ``SPEAKER_01``, ... in order of first appearance in the transcript.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import TypeVar

import numpy as np

from batch_job.result import Segment, Transcript, Word
from batch_job.speakers.partials import Partial

T = TypeVar("T")

LABEL_FORMAT = "SPEAKER_{:02d}"
MIN_TURN_S = 0.8
"""A turn shorter than this, inside another speaker's talk, is checked by :func:`_smooth`."""
MAX_FLIP_WORDS = 2


def label_transcript(transcript: Transcript, partials: Sequence[Partial], embeddings: np.ndarray,
                     centres: np.ndarray) -> Transcript:
    """``transcript`` with a ``speaker`` on every segment and word; ``embeddings [N, D]`` of ``partials``,
    ``centres [k, D]`` of the speakers (both unit length)."""
    # What gets a speaker, in transcript order: each word, or a segment without words as a whole.
    spans = [(w.start, w.end) for s in transcript.segments for w in (s.words or (s,))]
    speakers = _smooth(_nearest_speaker(spans, partials, embeddings, centres), spans)
    names: dict[int, str] = {}
    for index in speakers:
        names.setdefault(index, LABEL_FORMAT.format(len(names)))
    labels = iter(names[i] for i in speakers)
    segments: list[Segment] = []
    for seg in transcript.segments:
        if not seg.words:
            segments.append(replace(seg, speaker=next(labels)))
            continue
        labelled = [replace(w, speaker=next(labels)) for w in seg.words]
        segments.extend(_split_at_changes(seg, labelled))
    return replace(transcript, segments=tuple(segments), speakers=tuple(names.values()))


def _nearest_speaker(spans: Sequence[tuple[float, float]], partials: Sequence[Partial], embeddings: np.ndarray,
                     centres: np.ndarray) -> list[int]:
    """Speaker index per ``(start, end)`` span: overlap-weighted mean embedding of its partials vs the centres."""
    if not spans:
        return []
    starts = np.array([p.start for p in partials])
    ends = np.array([p.end for p in partials])
    out: list[int] = []
    for a, b in spans:
        overlap = np.minimum(ends, max(b, a + 0.02)) - np.maximum(starts, a)
        if not (overlap > 0).any():  # no partial reaches it: the nearest one in time
            overlap = -np.abs((starts + ends) / 2 - (a + b) / 2)
            overlap = (overlap == overlap.max()).astype(float)
        weights = np.clip(overlap, 0.0, None)
        voice = weights @ embeddings
        out.append(int(np.argmax(centres @ voice)))
    return out


def _smooth(speakers: list[int], spans: Sequence[tuple[float, float]]) -> list[int]:
    """Short runs inside another speaker's talk given to that speaker (see the module docstring)."""
    runs = _runs(speakers)
    out = list(speakers)
    for i in range(1, len(runs) - 1):
        (_, _, prev), (a, b, this), (_, _, nxt) = runs[i - 1], runs[i], runs[i + 1]
        seconds = spans[b - 1][1] - spans[a][0]
        if prev == nxt != this and b - a <= MAX_FLIP_WORDS and seconds < MIN_TURN_S:
            out[a:b] = [prev] * (b - a)
    return out


def _runs(values: Sequence[T]) -> list[tuple[int, int, T]]:
    """``(start, end, value)`` of each run of equal consecutive values."""
    runs: list[tuple[int, int, T]] = []
    for i, v in enumerate(values):
        if runs and runs[-1][2] == v:
            runs[-1] = (runs[-1][0], i + 1, v)
        else:
            runs.append((i, i + 1, v))
    return runs


def _split_at_changes(seg: Segment, words: list[Word]) -> list[Segment]:
    """``seg`` as one segment per run of one speaker's words; the first keeps its start, the last its end."""
    runs = _runs([w.speaker or "" for w in words])
    if len(runs) == 1:
        return [replace(seg, words=tuple(words), speaker=words[0].speaker)]
    out = []
    for index, (a, b, speaker) in enumerate(runs):
        part = tuple(words[a:b])
        start = seg.start if index == 0 else part[0].start
        end = seg.end if index == len(runs) - 1 else part[-1].end
        text = "".join(w.word for w in part).strip()
        out.append(Segment(start=start, end=end, text=text, words=part, speaker=speaker))
    return out
