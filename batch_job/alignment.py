"""Word-level timestamps from cross-attention: openai/whisper's ``timing.py``, in numpy.

Whisper's "alignment heads" (a few decoder cross-attention heads per checkpoint) attend to the
audio frame being spoken while the decoder emits each token. openai's method, followed here
step by step: crop the attention to the real audio, z-normalise each head over the tokens,
median-filter along time, average the heads, then dynamic time warping (DTW) on the negated
matrix gives a monotonic token → frame path; the frame where a word's first token starts on the
path is the word's start, the next word's start its end. Tokens are grouped into words the way
openai's tokenizer does (spaces and punctuation; Unicode boundaries for languages written
without spaces), leading/trailing punctuation is merged into its word, and openai's heuristics
clamp implausibly long words at sentence ends and segment edges.

No model here and no numba: the caller runs the decoder (teacher-forced on the chosen tokens)
and passes the alignment heads' attention weights; DTW is vectorised over anti-diagonals (a
~100 × 1500 matrix takes a few milliseconds). Times are seconds from the start of the 30 s
window; :func:`shift_words` (or ``time_offset`` of :func:`assign_words`) moves them onto the
file's timeline.
"""

from __future__ import annotations

import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy import ndimage

from batch_job.constants import HOP_LENGTH, N_AUDIO_CTX, N_FRAMES, SAMPLE_RATE

if TYPE_CHECKING:
    import torch

MEL_FRAMES_PER_POSITION = N_FRAMES // N_AUDIO_CTX
"""2: the encoder's stride-2 convolution turns two mel frames into one audio position."""
TOKENS_PER_SECOND = SAMPLE_RATE / (HOP_LENGTH * MEL_FRAMES_PER_POSITION)
"""50 encoder positions per second: a DTW time index ``t`` is ``t / 50`` s (20 ms steps)."""
MEDFILT_WIDTH = 7
"""openai's median filter width (encoder positions) along time."""
PREPEND_PUNCTUATIONS = "\"'“¿([{-"
"""Punctuation that joins the FOLLOWING word (openai's default)."""
APPEND_PUNCTUATIONS = "\"'.。,，!！?？:：”)]}、"
"""Punctuation that joins the PREVIOUS word (openai's default)."""
SENTENCE_END_MARKS = ".。!！?？"
"""Words that end a sentence: the word after one, or the mark itself, may be clamped."""
MEDIAN_WORD_CAP_SECONDS = 0.7
"""The median word duration used by the clamps is capped at 0.7 s (openai)."""
MAX_DURATION_MEDIANS = 2.0
"""A word longer than 2 × median duration counts as too long (openai)."""
PAUSE_MEDIANS = 4.0
"""A first word ending > 4 × median after the last speech follows a pause (openai)."""
SEGMENT_EDGE_SLACK_SECONDS = 0.5
"""Segment timestamps win over word times that overshoot them by more than 0.5 s (openai)."""
WORD_TIME_DECIMALS = 2
"""openai rounds word times to 10 ms when it places them on the file timeline."""
REPLACEMENT_CHAR = "\ufffd"
"""What a decoder writes for an incomplete UTF-8 sequence (a token that is part of a character)."""

_DIAG, _UP, _LEFT = 0, 1, 2  # DTW trace codes (openai's)


@dataclass(frozen=True)
class WordTiming:
    """One word: its text (with Whisper's leading space), token ids, times (s) and mean token probability."""

    word: str
    tokens: tuple[int, ...]
    start: float
    end: float
    probability: float


@dataclass(frozen=True)
class DurationLimits:
    """openai's word-duration bounds for one window: ``median`` (≤ 0.7 s) and ``max`` (= 2 × median)."""

    median: float
    max: float


@dataclass(frozen=True)
class SegmentWords:
    """A segment's words and its start/end, possibly moved by :func:`assign_words` (file seconds)."""

    start: float
    end: float
    words: tuple[WordTiming, ...]


# --------------------------------------------------------------------------- DTW, median filter


def dtw(cost: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Monotonic alignment path through ``cost`` [N, M] (low cost = good), openai's ``dtw_cpu``.

    Accumulated cost ``D[i, j] = cost[i-1, j-1] + min(D[i-1, j-1], D[i-1, j], D[i, j-1])`` with
    openai's tie rule (diagonal only when strictly smallest, then up when strictly smallest,
    else left) and openai's float32 accumulator. The backtrace starts at ``[N, M]``.
    Returns ``(text_indices, time_indices)``, two int arrays [path_length] from ``(0, 0)`` to
    ``(N-1, M-1)``: row ``text_indices[k]`` is matched with column ``time_indices[k]``.
    """
    x = np.asarray(cost, dtype=np.float64)
    if x.ndim != 2 or 0 in x.shape:
        raise ValueError(f"dtw needs a non-empty 2-D cost matrix, got shape {x.shape}")
    n, m = x.shape
    width = m + 1
    acc = np.full((n + 1) * width, np.inf, dtype=np.float32)  # D, flattened row-major
    acc[0] = 0.0
    trace = np.full((n + 1) * width, -1, dtype=np.int8)
    padded = np.zeros((n + 1, width))
    padded[1:, 1:] = x
    flat_x = padded.ravel()  # flat_x[i * width + j] = cost[i-1, j-1]
    # Cell (i, j) sits at i * width + j = i * m + (i + j): an anti-diagonal i + j = d is a
    # stride-m slice, and so are its diagonal, upper and left neighbours (-width-1, -width, -1).
    for d in range(2, n + m + 1):
        lo, hi = max(1, d - m), min(n, d - 1)
        first, stop = lo * m + d, hi * m + d + 1
        c0 = acc[first - width - 1 : stop - width - 1 : m]
        c1 = acc[first - width : stop - width : m]
        c2 = acc[first - 1 : stop - 1 : m]
        diag = (c0 < c1) & (c0 < c2)
        up = ~diag & (c1 < c0) & (c1 < c2)
        acc[first:stop:m] = flat_x[first:stop:m] + np.where(diag, c0, np.where(up, c1, c2))
        trace[first:stop:m] = np.where(diag, _DIAG, np.where(up, _UP, _LEFT))
    return _backtrace(trace.reshape(n + 1, width))


def _backtrace(trace: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """openai's ``backtrace``: walk ``trace`` [N+1, M+1] from the corner to ``(0, 0)``."""
    trace = trace.copy()
    trace[0, :] = _LEFT
    trace[:, 0] = _UP
    i, j = trace.shape[0] - 1, trace.shape[1] - 1
    path = []
    while i > 0 or j > 0:
        path.append((i - 1, j - 1))
        t = trace[i, j]
        if t == _DIAG:
            i, j = i - 1, j - 1
        elif t == _UP:
            i -= 1
        elif t == _LEFT:
            j -= 1
        else:
            raise ValueError(f"unexpected DTW trace value {t} at {(i, j)}")
    result = np.array(path[::-1], dtype=np.int64).reshape(-1, 2)
    return result[:, 0], result[:, 1]


def median_filter(x: np.ndarray, width: int) -> np.ndarray:
    """Median of each ``width`` window along the LAST axis of ``x`` [..., T], same shape out.

    Edges use reflect padding (``x[1], x[0] | x[0], x[1], ...``, the edge not repeated), as
    openai's ``F.pad(mode="reflect")``. ``width`` must be odd; when ``T <= width // 2`` the
    input is returned unchanged (reflect padding is impossible), as openai does.
    """
    if width <= 0 or width % 2 != 1:
        raise ValueError(f"median filter width must be a positive odd number, got {width}")
    x = np.asarray(x)
    pad = width // 2
    if x.shape[-1] <= pad or width == 1:
        return x
    # scipy's "mirror" is torch's (and numpy's) "reflect"; its C loop beats sorting every window
    # (which took 0.6 of 10 s transcribing the speaker tests' conversations with word timestamps).
    return ndimage.median_filter(x, size=(1,) * (x.ndim - 1) + (width,), mode="mirror")


# --------------------------------------------------------------------------- tokens → words


def split_to_word_tokens(
    tokens: Sequence[int], decode: Callable[[Sequence[int]], str], *, no_space: bool
) -> tuple[list[str], list[list[int]]]:
    """Group text token ids into words: ``(words, word_tokens)``, two lists of equal length.

    ``decode`` turns ids into text (partial UTF-8 shown as U+FFFD). ``no_space`` (the languages
    of :data:`~batch_job.constants.NO_SPACE_LANGUAGES`) splits at every complete Unicode character sequence (openai's
    ``split_tokens_on_unicode``); otherwise those pieces are joined into words that start at a
    leading space or a punctuation piece (``split_tokens_on_spaces``). Every token lands in
    exactly one word, in order. ``tokens`` are text tokens only (ids below ``<|endoftext|>``).
    """
    subwords, subword_tokens = _split_on_unicode(list(tokens), decode)
    if no_space:
        return subwords, subword_tokens
    words: list[str] = []
    word_tokens: list[list[int]] = []
    for subword, toks in zip(subwords, subword_tokens):
        if not words or subword.startswith(" ") or subword.strip() in string.punctuation:
            words.append(subword)
            word_tokens.append(list(toks))
        else:
            words[-1] += subword
            word_tokens[-1].extend(toks)
    return words, word_tokens


def _split_on_unicode(tokens: list[int], decode: Callable[[Sequence[int]], str]) -> tuple[list[str], list[list[int]]]:
    """openai's ``split_tokens_on_unicode``: cut wherever the tokens so far decode to whole characters.

    A U+FFFD in the running piece means a character is still incomplete, unless the full text
    has a U+FFFD at that very place too (a genuinely invalid byte). Leftover tokens at the end
    (possible only if ``decode`` is not prefix-consistent) form a last piece, so none is lost.
    """
    decoded_full = decode(tokens)
    words: list[str] = []
    word_tokens: list[list[int]] = []
    current: list[int] = []
    offset = 0
    for token in tokens:
        current.append(token)
        decoded = decode(current)
        bad = decoded.find(REPLACEMENT_CHAR)
        if bad < 0 or (offset + bad < len(decoded_full) and decoded_full[offset + bad] == REPLACEMENT_CHAR):
            words.append(decoded)
            word_tokens.append(current)
            current = []
            offset += len(decoded)
    if current:
        words.append(decode(current))
        word_tokens.append(current)
    return words, word_tokens


# --------------------------------------------------------------------------- alignment


def find_alignment(
    weights: np.ndarray | torch.Tensor,
    text_tokens: Sequence[int],
    token_probs: Sequence[float],
    num_frames: int,
    decode: Callable[[Sequence[int]], str],
    *,
    no_space: bool,
    medfilt_width: int = MEDFILT_WIDTH,
) -> list[WordTiming]:
    """Word timings (seconds from the window start) for ``text_tokens`` from cross-attention.

    ``weights`` [heads, n_tokens, n_frames]: the alignment heads' cross-attention, softmaxed over
    the encoder positions (``n_frames``, normally 1500), of the decoder run teacher-forced on
    ``<|sot|> ... <|notimestamps|> text_tokens... <|endoftext|>``. Exactly
    ``n_tokens = len(text_tokens) + 1`` rows: row ``i`` is the query at the position whose
    OUTPUT is token ``i`` of ``text_tokens + [eot]`` -- row 0 is the last prompt token
    (``<|notimestamps|>``), the last row is the last text token (the step emitting eot). The rows
    of the other prompt tokens and of eot's own position are not passed (openai slices them off
    with ``matrix[len(sot_sequence):-1]``).

    ``token_probs`` [len(text_tokens)]: each text token's probability (softmax over the text
    vocabulary); a word's probability is the mean over its tokens. ``num_frames``: mel frames of
    real audio in the window (≤ 3000); attention is cropped to ``num_frames // 2`` positions
    and renormalised, which equals openai's softmax over the cropped logits. Then openai's steps:
    z-normalise each head over tokens, median filter (``medfilt_width``) along time, mean over
    heads, :func:`dtw` on the negated matrix; the first time index of each token row on the path
    is that token's start (``index / 50`` s). A word ends where the next word (or eot) starts.
    Returns ``[]`` when there are no text tokens.
    """
    n_text = len(text_tokens)
    if n_text == 0:
        return []
    w = _as_numpy(weights)
    if w.ndim != 3 or w.shape[1] != n_text + 1:
        raise ValueError(f"weights must be [heads, {n_text + 1} (text tokens + eot), frames], got shape {w.shape}")
    if len(token_probs) != n_text:
        raise ValueError(f"{len(token_probs)} token probabilities for {n_text} text tokens")
    frames = min(max(1, int(num_frames) // MEL_FRAMES_PER_POSITION), w.shape[2])
    w = w[:, :, :frames]
    total = w.sum(axis=-1, keepdims=True)
    w = w / np.where(total > 0, total, 1.0)
    mean = w.mean(axis=-2, keepdims=True)
    std = w.std(axis=-2, keepdims=True)  # population std (openai: unbiased=False)
    w = (w - mean) / np.where(std > 0, std, 1.0)  # std 0 (all rows equal) would be NaN in openai
    w = median_filter(w, medfilt_width)
    matrix = w.mean(axis=0)  # [n_text + 1, frames]
    text_indices, time_indices = dtw(-matrix)

    words, word_tokens = split_to_word_tokens(text_tokens, decode, no_space=no_space)
    boundaries = np.concatenate([[0], np.cumsum([len(t) for t in word_tokens])])  # last = the eot row
    jumps = np.diff(text_indices, prepend=-1).astype(bool)
    jump_times = time_indices[jumps] / TOKENS_PER_SECOND  # [n_text + 1]: each row's first time
    probs = np.asarray(token_probs, dtype=np.float64)
    return [
        WordTiming(
            word=word,
            tokens=tuple(int(t) for t in toks),
            start=float(jump_times[a]),
            end=float(jump_times[b]),
            probability=float(probs[a:b].mean()),
        )
        for word, toks, a, b in zip(words, word_tokens, boundaries[:-1], boundaries[1:])
    ]


def _as_numpy(weights: Any) -> np.ndarray:
    """A float64 numpy copy of a numpy array or (any-device, any-dtype) torch tensor."""
    if hasattr(weights, "detach"):
        weights = weights.detach().float().cpu().numpy()
    return np.asarray(weights, dtype=np.float64)


# --------------------------------------------------------------------------- post-processing


def merge_punctuations(
    words: Sequence[WordTiming], prepended: str = PREPEND_PUNCTUATIONS, appended: str = APPEND_PUNCTUATIONS
) -> list[WordTiming]:
    """openai's ``merge_punctuations``: leading punctuation joins the next word, trailing the previous.

    A word that is `` <p>`` (space + a ``prepended`` mark) is prefixed to the following word; a
    word in ``appended`` directly after a word (no space between) is suffixed to it. The
    receiving word keeps its times and probability and gains the tokens; the absorbed entries
    are dropped (openai leaves them empty), so tokens stay in order and none is lost.
    """
    items = [[w.word, list(w.tokens)] for w in words]
    i, j = len(items) - 2, len(items) - 1
    while i >= 0:
        previous, following = items[i], items[j]
        if previous[0].startswith(" ") and previous[0].strip() in prepended:
            following[0] = previous[0] + following[0]
            following[1] = previous[1] + following[1]
            previous[0], previous[1] = "", []
        else:
            j = i
        i -= 1
    i, j = 0, 1
    while j < len(items):
        previous, following = items[i], items[j]
        if not previous[0].endswith(" ") and following[0] in appended:
            previous[0] = previous[0] + following[0]
            previous[1] = previous[1] + following[1]
            following[0], following[1] = "", []
        else:
            i = j
        j += 1
    return [replace(w, word=text, tokens=tuple(toks)) for w, (text, toks) in zip(words, items) if text]


def duration_limits(words: Sequence[WordTiming]) -> DurationLimits:
    """Median of the non-zero word durations (capped at 0.7 s) and twice that; zeros when none."""
    durations = np.array([w.end - w.start for w in words], dtype=np.float64)
    durations = durations[durations.nonzero()]
    median = min(MEDIAN_WORD_CAP_SECONDS, float(np.median(durations))) if len(durations) else 0.0
    return DurationLimits(median=median, max=median * MAX_DURATION_MEDIANS)


def truncate_at_sentence_ends(words: Sequence[WordTiming], limits: DurationLimits) -> list[WordTiming]:
    """openai's hack: a too-long (> ``limits.max``) sentence-end mark loses its tail, and a too-long
    word right after one loses its head, down to ``limits.max``. Run before :func:`merge_punctuations`.
    """
    out = list(words)
    if limits.max <= 0:
        return out
    for i in range(1, len(out)):
        w = out[i]
        if w.end - w.start > limits.max:
            if w.word in SENTENCE_END_MARKS:
                out[i] = replace(w, end=w.start + limits.max)
            elif out[i - 1].word in SENTENCE_END_MARKS:
                out[i] = replace(w, start=w.end - limits.max)
    return out


def constrain_segment(
    words: Sequence[WordTiming], start: float, end: float, limits: DurationLimits, *, last_speech: float
) -> SegmentWords:
    """openai's segment-edge hacks for one segment's words (all times on one timeline).

    After a pause (first word ends > 4 × median past ``last_speech``) a too-long first (or
    second) word is shortened to ``limits.max``. Then the segment's own ``start``/``end`` win
    when the first/last word overshoots them by more than 0.5 s; otherwise the segment snaps to
    its words. Returns the possibly moved segment bounds and words; no words → unchanged.
    """
    if not words:
        return SegmentWords(start=start, end=end, words=())
    ws = [[w.start, w.end] for w in words]
    median, max_d = limits.median, limits.max
    if ws[0][1] - last_speech > median * PAUSE_MEDIANS and (
        ws[0][1] - ws[0][0] > max_d or (len(ws) > 1 and ws[1][1] - ws[0][0] > max_d * 2)
    ):
        if len(ws) > 1 and ws[1][1] - ws[1][0] > max_d:
            boundary = max(ws[1][1] / 2, ws[1][1] - max_d)
            ws[0][1] = ws[1][0] = boundary
        ws[0][0] = max(0.0, ws[0][1] - max_d)
    if start < ws[0][1] and start - SEGMENT_EDGE_SLACK_SECONDS > ws[0][0]:
        ws[0][0] = max(0.0, min(ws[0][1] - median, start))
    else:
        start = ws[0][0]
    if end > ws[-1][0] and end + SEGMENT_EDGE_SLACK_SECONDS < ws[-1][1]:
        ws[-1][1] = max(ws[-1][0] + median, end)
    else:
        end = ws[-1][1]
    moved = tuple(replace(w, start=float(a), end=float(b)) for w, (a, b) in zip(words, ws))
    return SegmentWords(start=float(start), end=float(end), words=moved)


def assign_words(
    alignment: Sequence[WordTiming],
    segment_tokens: Sequence[Sequence[int]],
    segment_bounds: Sequence[tuple[float, float]],
    *,
    last_speech: float,
    time_offset: float = 0.0,
    prepended: str = PREPEND_PUNCTUATIONS,
    appended: str = APPEND_PUNCTUATIONS,
) -> tuple[list[SegmentWords], float]:
    """openai's ``add_word_timestamps`` minus the model: a window's words dealt out to its segments.

    ``alignment``: :func:`find_alignment` of the window's text tokens (window seconds).
    ``segment_tokens``: each segment's text token ids, in order (together: the aligned tokens).
    ``segment_bounds``: each segment's ``(start, end)`` in FILE seconds. Words are clamped at
    sentence ends, punctuation merged, shifted by ``time_offset`` (the window start, s) and
    rounded to 10 ms, handed to segments by token count, then :func:`constrain_segment`
    applies with ``last_speech`` (the end of the previous speech, file seconds).
    Returns one :class:`SegmentWords` per segment and the updated ``last_speech``.
    """
    if len(segment_tokens) != len(segment_bounds):
        raise ValueError(f"{len(segment_tokens)} token lists for {len(segment_bounds)} segments")
    limits = duration_limits(alignment)
    merged = merge_punctuations(truncate_at_sentence_ends(alignment, limits), prepended, appended)
    merged = [
        replace(w, start=round(time_offset + w.start, WORD_TIME_DECIMALS), end=round(time_offset + w.end, WORD_TIME_DECIMALS))
        for w in merged
    ]
    out: list[SegmentWords] = []
    index = 0
    for tokens, (start, end) in zip(segment_tokens, segment_bounds):
        saved, words = 0, []
        while index < len(merged) and saved < len(tokens):
            words.append(merged[index])
            saved += len(merged[index].tokens)
            index += 1
        seg = constrain_segment(words, start, end, limits, last_speech=last_speech)
        if seg.words:
            last_speech = seg.end
        out.append(seg)
    return out, last_speech


def shift_words(words: Sequence[WordTiming], offset: float) -> list[WordTiming]:
    """``words`` with ``offset`` seconds added to every start and end (window → file timeline)."""
    return [replace(w, start=w.start + offset, end=w.end + offset) for w in words]
