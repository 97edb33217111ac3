"""Short windows of DIFFERENT files sharing one encoder row, and the row's result dealt back.

Whisper's encoder always runs on 30 s. A 7 s voicemail alone in a row pays for 30 s of encoder
work; on CPU the encoder is most of the compute on short files (docs/benchmarks.md, "Where the
time goes"). So the stream may put several short windows, of different files with the same
decoding options, into one row: their audio is concatenated with :data:`ROW_GAP_SECONDS` of
silence between them, decoded once, and the row's timestamped segments are dealt back to the
windows they lie in (:func:`split_row`), each re-based to its own window's timeline, as if it
had been decoded alone. The transcriber's guards (compression ratio, log-probability, tails)
then judge each window on its own.

Text never moves between files: a segment that lies across the gap between two windows (reaching
past the neighbour's leading or trailing silence into its speech) is dealt to neither, and both
windows come back as ``None``, to be decoded again; the row's other windows keep their text. Whisper often closes a segment only where the next speech starts, so a segment may run
through the gap and the neighbour's silence (:func:`~batch_job.segment.speech_extent`) without
counting as lying across. A window the row did not reach (decoding stopped early) or gave no text
comes back as ``None`` too: every window holds speech, so a shared row that passed over one must
not drop it. A window passed over goes into one more shared row, with none of the first row's
windows (:data:`ROW_MAX_TRIES`, the stream keeps count), then alone.

Rows are shared only where the row's language is the language of every window in it (a fixed
``--language``, or an English-only model) and without word timestamps (the alignment heads'
attention is not split here); the server never shares a row between requests.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from batch_job.audio import SAMPLE_RATE
from batch_job.constants import CHUNK_SECONDS, SECONDS_PER_TIMESTAMP
from batch_job.engine.decoding import DecodingResult
from batch_job.segment import with_gaps

ROW_GAP_SECONDS = 1.0
"""Silence between windows of different files in one row: long enough for Whisper to end a
segment there (a segment across it makes the row unsplittable)."""
ROW_MAX_PARTS = 6
"""Most windows in one row (their text shares the row's ``max_new_tokens``)."""
ROW_MAX_TRIES = 2
"""Shared rows a window may be passed over by before it is decoded alone: the second one holds
none of the first one's windows (a segment across two windows is dealt to neither)."""
STRAY_SECONDS = 0.2
"""A segment may reach this far into a neighbouring window's speech (timestamps are 20 ms tokens
and drift a little) before it counts as lying across two windows."""
ROW_SAMPLES = CHUNK_SECONDS * SAMPLE_RATE
ROW_GAP_SAMPLES = int(ROW_GAP_SECONDS * SAMPLE_RATE)


def plan_rows(lengths: Sequence[int], shareable: Sequence[bool], *, max_rows: int,
              capacity: int = ROW_SAMPLES, gap: int = ROW_GAP_SAMPLES, max_parts: int = ROW_MAX_PARTS,
              missed: Sequence[Collection[int]] | None = None,
              widths: Sequence[int] | None = None) -> list[tuple[int, ...]]:
    """First-fit rows over windows given longest first: rows of indices filling at most ``max_rows`` batch rows.

    ``lengths[i]``: window ``i``'s samples; a window that is not ``shareable`` (a retry, or one
    that shared rows passed over too often) gets a row of its own, ``widths[i]`` batch rows wide
    (default 1; a temperature fallback decoded at several temperatures at once is wider);
    ``missed[i]``: the ids of the shared rows that passed window ``i`` over, two windows that were
    in one such row never share again. Windows that fit in no row are left out (they wait for the
    next batch). Each row keeps its windows in the order given.
    """
    apart = [set(m) for m in missed] if missed is not None else [set() for _ in lengths]
    rows: list[list[int]] = []
    used: list[int] = []
    slots = 0  # batch rows taken
    for i, n in enumerate(lengths):
        width = widths[i] if widths is not None else 1
        if shareable[i] and width == 1:
            for r, row in enumerate(rows):
                if (len(row) < max_parts and used[r] + gap + n <= capacity
                        and not any(apart[i] & apart[j] for j in row)):
                    row.append(i)
                    used[r] += gap + n
                    break
            else:
                if slots < max_rows:
                    rows.append([i])
                    used.append(n)
                    slots += 1
        elif slots + width <= max_rows:
            rows.append([i])
            used.append(capacity)  # full: nothing joins a window that must stay alone
            slots += width
    return [tuple(r) for r in rows]


def join_row(parts: Sequence[np.ndarray], gap: int = ROW_GAP_SAMPLES) -> np.ndarray:
    """One row's audio: ``parts`` (float32 ``[n_i]``) with ``gap`` samples of silence between them."""
    return with_gaps(list(parts), gap)


def part_offsets(part_samples: Sequence[int], gap: int = ROW_GAP_SAMPLES) -> list[int]:
    """Where each window starts in the row (samples)."""
    out, pos = [], 0
    for n in part_samples:
        out.append(pos)
        pos += n + gap
    return out


def split_row(result: DecodingResult, part_samples: Sequence[int], *, timestamp_begin: int,
              gap: int = ROW_GAP_SAMPLES,
              speech: Sequence[tuple[int, int]] | None = None) -> list[DecodingResult | None]:
    """Deal a shared row's result to its windows; ``None`` for each window it cannot give text to.

    Returns one result per window, in window coordinates (timestamps re-based to the window's
    start), or ``None`` for a window that a segment lies across (with a neighbour), that the row's
    decoding did not reach, or that got no text. A window fully decoded ends with a closing
    timestamp (the transcriber reads it as consumed); one the decoding stopped inside ends with a
    repeated timestamp at its last complete segment (the rest of it is its tail). ``speech[k]``:
    where window ``k``'s active audio begins and ends, in its own samples (default: all of it).
    """
    tb = timestamp_begin
    segments, open_segment = _segments(result, tb)
    offsets = part_offsets(part_samples, gap)
    extents = list(speech) if speech is not None else [(0, n) for n in part_samples]
    row_end = offsets[-1] + part_samples[-1]
    if open_segment is not None and open_segment.text and not segments:
        # One unfinished segment and nothing else: as a window alone, it counts as the whole row.
        open_segment.end = row_end / SAMPLE_RATE
        segments, open_segment = [open_segment], None
    consumed = row_end if open_segment is None else (int(round(segments[-1].end * SAMPLE_RATE)) if segments else 0)
    dealt: list[list[_Seg]] = [[] for _ in part_samples]
    across: set[int] = set()
    for seg in segments:
        a, b = int(round(seg.start * SAMPLE_RATE)), int(round(seg.end * SAMPLE_RATE))
        overlaps = [min(b, o + n) - max(a, o) for o, n in zip(offsets, part_samples)]
        k = max(range(len(overlaps)), key=overlaps.__getitem__)
        if overlaps[k] <= 0:  # wholly inside a gap: the nearest window
            k = min(range(len(offsets)), key=lambda j: min(abs(a - offsets[j]), abs(a - offsets[j] - part_samples[j])))
        others = [j for j in range(len(overlaps)) if j != k and _into_speech(j > k, a, b, offsets[j], extents[j])]
        if others:  # across two files' windows: never guess whose words these are
            across.update([k, *others])
            continue
        o, n = offsets[k] / SAMPLE_RATE, part_samples[k] / SAMPLE_RATE
        dealt[k].append(_Seg(min(max(seg.start - o, 0.0), n), min(max(seg.end - o, 0.0), n), seg.text, seg.stamps))
    out: list[DecodingResult | None] = []
    for k, (o, n) in enumerate(zip(offsets, part_samples)):
        if k in across or consumed <= o or not dealt[k]:
            out.append(None)  # not reached, nothing complete in it, or shared a segment: decoded again
        else:
            out.append(_part_result(result, dealt[k], tb, complete=consumed >= o + n))
    return out


def _into_speech(after: bool, a: int, b: int, offset: int, extent: tuple[int, int]) -> bool:
    """Whether segment ``[a, b)`` (row samples) reaches more than :data:`STRAY_SECONDS` into the
    speech of the window at ``offset`` whose active audio is ``extent``: from before it
    (``after``: the window comes later in the row) or from after it."""
    stray = STRAY_SECONDS * SAMPLE_RATE
    if after:
        return b > offset + extent[0] + stray
    return a < offset + extent[1] - stray


def _segments(result: DecodingResult, tb: int) -> tuple[list[_Seg], _Seg | None]:
    """Closed segments in row seconds, in order, and the open one decoding stopped inside (if any)."""
    logprobs = result.token_logprobs or (result.avg_logprob,) * len(result.tokens)
    closed: list[_Seg] = []
    current: _Seg | None = None
    last_end = 0.0
    for tok, lp in zip(result.tokens, logprobs):
        if tok >= tb:
            t = (tok - tb) * SECONDS_PER_TIMESTAMP
            if current is None:
                current = _Seg(t, t, [], [lp])
            else:
                if current.text:
                    closed.append(_Seg(current.start, max(t, current.start), current.text, [*current.stamps, lp]))
                last_end, current = t, None
        else:
            if current is None:
                current = _Seg(last_end, last_end, [], [])
            current.text.append((tok, lp))
    return closed, current  # an open segment, even empty, means decoding stopped inside the row


def _part_result(row: DecodingResult, segments: list[_Seg], tb: int, *, complete: bool) -> DecodingResult | None:
    """One window's share of the row, as the decoder would have given it for the window alone.

    ``None`` when the row gave the window no text: every window holds speech (the segmenter cut
    it around some), so a window the shared decoding passed over is decoded again.
    """
    if not any(s.text for s in segments):
        return None
    tokens: list[int] = []
    logprobs: list[float] = []
    for seg in segments:
        tokens += [tb + int(round(seg.start / SECONDS_PER_TIMESTAMP)), *(t for t, _ in seg.text),
                   tb + int(round(seg.end / SECONDS_PER_TIMESTAMP))]
        logprobs += [seg.stamps[0], *(lp for _, lp in seg.text), seg.stamps[-1]]
    if not complete:
        tokens.append(tokens[-1])  # stopped at a segment boundary: the rest is this window's tail
        logprobs.append(0.0)
    return replace(row, tokens=tuple(tokens), token_logprobs=tuple(logprobs),
                   avg_logprob=sum(logprobs) / len(logprobs), truncated=row.truncated and not complete,
                   alignment=None)


@dataclass
class _Seg:
    """A decoded segment of the row: seconds, its text tokens with their log-probabilities, and
    the log-probabilities of its opening and closing timestamps."""

    start: float
    end: float
    text: list[tuple[int, float]] = field(default_factory=list)
    stamps: list[float] = field(default_factory=list)
