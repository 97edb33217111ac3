"""Cut long audio into windows of at most 30 s at pauses, keeping the file's timeline.

One cheap numpy pass computes the log energy of 10 ms frames. A frame is *active* (probably
speech) when it is ``margin_db`` above an adaptive noise floor (a low percentile of the frame
energies in ~30 s blocks, the minimum over neighbouring blocks) and above an absolute floor.
Active frames closer than ``min_silence_s`` are merged into speech spans, padded by ``pad_s``;
spans that hold too little active audio are dropped. Silence longer than ``min_silence_s``
between spans is never windowed: decoding it costs compute and makes Whisper hallucinate
("Thank you."). Spans longer than a window are cut at the quietest point near the window end:
the middle of the latest real pause in ``[min_window_s, target_seconds]`` after the window start,
else the quietest frame before ``max_seconds``. Windows never exceed ``max_seconds``.

Windows are contiguous ``[start, end)`` sample ranges of the input array, sorted and
non-overlapping, so timestamps inside a window map back to the file by adding ``start_s``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from batch_job.audio import SAMPLE_RATE

FRAME_SECONDS = 0.01
"""Energy frame length and hop (10 ms, non-overlapping)."""
MARGIN_DB = 10.0
"""How far above the adaptive noise floor a frame must be to count as active (the default)."""
ABS_FLOOR_DB = -60.0
"""Frames quieter than this (dBFS) are never active (the default)."""

_EPS = 1e-10  # energy floor: -100 dBFS for digital silence


@dataclass(frozen=True)
class Window:
    """A stretch ``[start, end)`` of the input, in samples of the FILE timeline."""

    start: int
    end: int
    sample_rate: int = field(default=SAMPLE_RATE, compare=False)

    @property
    def start_s(self) -> float:
        """Start time in seconds from the beginning of the file."""
        return self.start / self.sample_rate

    @property
    def end_s(self) -> float:
        """End time (exclusive) in seconds from the beginning of the file."""
        return self.end / self.sample_rate

    @property
    def duration_s(self) -> float:
        """Length in seconds."""
        return (self.end - self.start) / self.sample_rate

    def slice(self, audio: np.ndarray) -> np.ndarray:
        """This window's samples of ``audio`` (a view, no copy)."""
        return audio[self.start : self.end]


@dataclass(frozen=True)
class _Params:
    frame: int  # samples per energy frame
    min_silence: int  # frames
    pad: int  # frames
    min_speech: int  # frames
    max_len: int  # frames
    target_len: int  # frames
    min_window: int  # frames
    smooth: int  # frames


def split_at_pauses(
    audio: np.ndarray,
    *,
    sample_rate: int = SAMPLE_RATE,
    max_seconds: float = 30.0,
    target_seconds: float = 28.0,
    min_window_seconds: float = 12.0,
    min_silence_s: float = 1.5,
    pad_s: float = 0.2,
    min_speech_s: float = 0.1,
    margin_db: float = MARGIN_DB,
    abs_floor_db: float = ABS_FLOOR_DB,
) -> list[Window]:
    """Windows of at most ``max_seconds`` covering the speech in ``audio``, cut at pauses.

    Args:
        audio: 1-D float array of shape ``(n_samples,)``, full scale ±1, at ``sample_rate`` Hz.
        sample_rate: Hz.
        max_seconds: hard upper bound on a window's length (Whisper's 30 s context).
        target_seconds: preferred latest cut when a real pause is available (≤ ``max_seconds``).
        min_window_seconds: a long span is not cut earlier than this after a window's start.
        min_silence_s: silences longer than this between speech are skipped (not windowed).
        pad_s: audio kept before and after each stretch of speech.
        min_speech_s: a span with less active audio than this is dropped (clicks, breaths).
        margin_db: how far above the adaptive noise floor a frame must be to count as active.
        abs_floor_db: frames quieter than this (dBFS) are never active.

    Returns:
        Sorted, non-overlapping windows (sample indices into ``audio``); empty for silence,
        stationary noise or audio too short/quiet to hold speech.
    """
    if audio.ndim != 1:
        raise ValueError(f"audio must be 1-D, got shape {audio.shape}")
    if not 0 < target_seconds <= max_seconds or min_window_seconds >= target_seconds:
        raise ValueError("need 0 < min_window_seconds < target_seconds <= max_seconds")
    frame = max(1, int(round(FRAME_SECONDS * sample_rate)))

    def to_frames(seconds: float) -> int:
        return max(1, int(round(seconds * sample_rate / frame)))

    prm = _Params(
        frame=frame,
        min_silence=to_frames(min_silence_s),
        pad=int(round(pad_s * sample_rate / frame)),
        min_speech=to_frames(min_speech_s),
        max_len=int(max_seconds * sample_rate) // frame,  # floor: never exceed max in samples
        target_len=to_frames(target_seconds),
        min_window=to_frames(min_window_seconds),
        smooth=to_frames(0.1),
    )
    if len(audio) < frame:
        return []
    db = frame_energy_db(audio, frame)
    active = db > _threshold_db(db, margin_db=margin_db, abs_floor_db=abs_floor_db)
    spans = _speech_spans(active, prm)
    windows: list[Window] = []
    n_samples = len(audio)
    for a, b in spans:
        for wa, wb in _cut_span(a, b, db, active, prm):
            start, end = wa * frame, min(wb * frame, n_samples)
            if end > start:
                windows.append(Window(start, end, sample_rate))
    return windows


def frame_energy_db(audio: np.ndarray, frame: int) -> np.ndarray:
    """Mean-square energy in dBFS of consecutive ``frame``-sample frames; shape ``(ceil(n/frame),)``."""
    n_full = len(audio) // frame
    full = np.ascontiguousarray(audio[: n_full * frame]).reshape(n_full, frame)
    energy = np.einsum("ij,ij->i", full, full, dtype=np.float64) / frame
    tail = audio[n_full * frame :]
    if len(tail):
        energy = np.append(energy, np.dot(tail.astype(np.float64), tail) / len(tail))
    return (10.0 * np.log10(energy + _EPS)).astype(np.float32)


def speech_extent(audio: np.ndarray, *, sample_rate: int = SAMPLE_RATE, margin_db: float = MARGIN_DB,
                  abs_floor_db: float = ABS_FLOOR_DB) -> tuple[int, int]:
    """Where the active audio of ``audio`` (float ``[n]``) begins and ends: ``(first, end)`` samples.

    Active as :func:`split_at_pauses` reads it (``margin_db`` over the noise floor, above
    ``abs_floor_db``), to the 10 ms frame; ``(0, n)`` when no frame is active (nothing to trim).
    """
    frame = max(1, int(round(FRAME_SECONDS * sample_rate)))
    if len(audio) < frame:
        return 0, len(audio)
    db = frame_energy_db(audio, frame)
    active = np.flatnonzero(db > _threshold_db(db, margin_db=margin_db, abs_floor_db=abs_floor_db))
    if not len(active):
        return 0, len(audio)
    return int(active[0]) * frame, min(len(audio), (int(active[-1]) + 1) * frame)


# --------------------------------------------------------------------------- internals

_BLOCK_FRAMES = 3000  # 30 s of 10 ms frames per noise-floor block
_FLOOR_PERCENTILE = 5.0


def _threshold_db(db: np.ndarray, *, margin_db: float, abs_floor_db: float) -> np.ndarray:
    """Per-frame activity threshold: adaptive noise floor + margin, never below the absolute floor."""
    n = len(db)
    n_blocks = -(-n // _BLOCK_FRAMES)
    padded = np.full(n_blocks * _BLOCK_FRAMES, np.nan, dtype=np.float32)
    padded[:n] = db
    floors = np.nanpercentile(padded.reshape(n_blocks, _BLOCK_FRAMES), _FLOOR_PERCENTILE, axis=1)
    # min over neighbouring blocks: a block that is all speech borrows its neighbours' floor
    neighbour = floors.copy()
    neighbour[1:] = np.minimum(neighbour[1:], floors[:-1])
    neighbour[:-1] = np.minimum(neighbour[:-1], floors[1:])
    per_frame = np.repeat(neighbour, _BLOCK_FRAMES)[:n]
    return np.maximum(per_frame + margin_db, abs_floor_db).astype(np.float32)


def _runs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Start and end (exclusive) indices of the runs of True in a 1-D bool array."""
    d = np.diff(np.concatenate(([0], mask.view(np.int8), [0])))
    return np.flatnonzero(d == 1), np.flatnonzero(d == -1)


def _speech_spans(active: np.ndarray, prm: _Params) -> list[tuple[int, int]]:
    """Padded frame spans of speech: active runs merged across gaps < min_silence."""
    starts, ends = _runs(active)
    if len(starts) == 0:
        return []
    gaps = starts[1:] - ends[:-1]
    breaks = np.flatnonzero(gaps >= prm.min_silence)
    span_starts = np.concatenate(([starts[0]], starts[breaks + 1]))
    span_ends = np.concatenate((ends[breaks], [ends[-1]]))
    csum = np.concatenate(([0], np.cumsum(active, dtype=np.int64)))
    n = len(active)
    spans = []
    for a, b in zip(span_starts.tolist(), span_ends.tolist()):
        if csum[b] - csum[a] < prm.min_speech:
            continue
        start = max(0, a - prm.pad, spans[-1][1] if spans else 0)
        spans.append((start, min(n, b + prm.pad)))
    return spans


def _cut_span(a: int, b: int, db: np.ndarray, active: np.ndarray, prm: _Params) -> list[tuple[int, int]]:
    """Split frame span ``[a, b)`` into pieces of at most ``max_len`` frames at quiet points."""
    pieces = []
    while b - a > prm.max_len:
        cut = _find_cut(a, db, active, prm)
        pieces.append((a, cut))
        a = cut
    pieces.append((a, b))
    return pieces


def _find_cut(a: int, db: np.ndarray, active: np.ndarray, prm: _Params) -> int:
    """Frame index to end a window starting at ``a``: a late real pause, else the quietest frame."""
    lo, hi = a + prm.min_window, a + prm.target_len
    starts, ends = _runs(~active[lo:hi])
    for min_pause in (3 * prm.smooth, prm.smooth):  # a clear pause (≥0.3 s), else a short one
        ok = np.flatnonzero((ends - starts) >= min_pause)
        if len(ok):
            i = ok[-1]  # the latest: longest windows, fewest windows
            return lo + int((starts[i] + ends[i]) // 2)
    hi = a + prm.max_len
    seg = db[lo:hi].astype(np.float64)
    k = min(prm.smooth, len(seg))
    smoothed = np.convolve(seg, np.ones(k) / k, mode="same")
    best = float(smoothed.min())
    near = np.flatnonzero(smoothed <= best + 1.0)
    return lo + int(near[-1])


@dataclass(frozen=True)
class Packed:
    """Several windows of one file decoded as ONE encoder window (at most ``max_seconds``).

    The encoder costs the same for 3 s as for 30 s of audio, so short stretches of speech that
    are separated by long silences are packed together: their samples are concatenated with
    ``gap`` samples of silence between them. :meth:`to_file` maps a time inside the packed
    window back to the file's timeline.
    """

    spans: tuple[tuple[int, int], ...]
    """``(start, end)`` sample ranges of the file, in order, non-overlapping."""
    gap: int = 0
    """Samples of silence inserted between consecutive spans."""

    @property
    def samples(self) -> int:
        return sum(b - a for a, b in self.spans) + self.gap * (len(self.spans) - 1)

    @property
    def start(self) -> int:
        return self.spans[0][0]

    def audio(self, audio: np.ndarray) -> np.ndarray:
        """The packed window's samples (a view when there is a single span)."""
        if len(self.spans) == 1:
            a, b = self.spans[0]
            return audio[a:b]
        return with_gaps([audio[a:b] for a, b in self.spans], self.gap)

    def _offsets(self) -> list[tuple[int, int, int]]:
        """``(window_start, file_start, file_end)`` of each span."""
        out, pos = [], 0
        for a, b in self.spans:
            out.append((pos, a, b))
            pos += (b - a) + self.gap
        return out

    def piece_starts(self) -> tuple[int, ...]:
        """Where each span begins in the window (samples): ``0`` first."""
        return tuple(w0 for w0, _, _ in self._offsets())

    def to_file(self, sample: int) -> int:
        """Sample index inside the packed window -> sample index in the file.

        A time inside an inserted gap maps to the end of the span before it.
        """
        result = self.spans[0][0]
        for w0, a, b in self._offsets():
            if sample < w0:
                break
            result = min(a + (sample - w0), b)
        return result

    def place(self, start: int, end: int) -> tuple[int, int]:
        """A stretch ``[start, end)`` of the window (samples) -> the same stretch in the file."""
        return self.to_file(start), self.to_file(end)

    def tail(self, sample: int) -> Packed | None:
        """What remains of the window after ``sample`` (window coordinates), or None."""
        rest: list[tuple[int, int]] = []
        for w0, a, b in self._offsets():
            if sample <= w0:
                rest.append((a, b))
            elif sample < w0 + (b - a):
                rest.append((a + sample - w0, b))
        return Packed(tuple(rest), self.gap) if rest else None

    def head(self, sample: int) -> Packed | None:
        """The window before ``sample`` (window coordinates), or None: what :meth:`tail` leaves out."""
        kept: list[tuple[int, int]] = []
        for w0, a, b in self._offsets():
            if sample <= w0:
                break
            kept.append((a, min(b, a + sample - w0)))
        return Packed(tuple(kept), self.gap) if kept else None


def with_gaps(pieces: list[np.ndarray], gap: int) -> np.ndarray:
    """``pieces`` concatenated with ``gap`` samples of silence between consecutive ones."""
    silence = np.zeros(gap, dtype=pieces[0].dtype)
    rows: list[np.ndarray] = []
    for i, piece in enumerate(pieces):
        if i:
            rows.append(silence)
        rows.append(piece)
    return np.concatenate(rows)


def pack_windows(
    windows: list[Window], *, sample_rate: int = SAMPLE_RATE, max_seconds: float = 30.0, gap_seconds: float = 0.5
) -> list[Packed]:
    """Greedily pack consecutive windows into encoder windows of at most ``max_seconds``.

    Order is kept (a packed window never reorders speech), and a window is never split.
    """
    gap = int(round(gap_seconds * sample_rate))
    limit = int(max_seconds * sample_rate)
    packed: list[Packed] = []
    current: list[tuple[int, int]] = []
    length = 0
    for w in windows:
        n = w.end - w.start
        if current and length + gap + n <= limit:
            current.append((w.start, w.end))
            length += gap + n
            continue
        if current:
            packed.append(Packed(tuple(current), gap))
        current, length = [(w.start, w.end)], n
    if current:
        packed.append(Packed(tuple(current), gap))
    return packed


@dataclass(frozen=True)
class Joined:
    """Windows of one file that lie apart in the file, sharing ONE encoder pass.

    The undecoded tail of a window (often 2-8 s) and a file's short windows would each cost a
    full 30 s encoder pass. Joined, their audio is concatenated in file order with ``gap``
    samples of silence between the parts. Since the parts are far apart in the file, a decoded
    segment belongs to ONE part: the one it overlaps most (:meth:`place`), so a timestamp that
    strays a little across a join never moves text to another place in the file.
    """

    parts: tuple[Packed, ...]
    """The joined windows, in file order, non-overlapping."""
    gap: int = 0

    @property
    def samples(self) -> int:
        return sum(p.samples for p in self.parts) + self.gap * (len(self.parts) - 1)

    @property
    def start(self) -> int:
        return self.parts[0].start

    def _offsets(self) -> list[int]:
        out, pos = [], 0
        for p in self.parts:
            out.append(pos)
            pos += p.samples + self.gap
        return out

    def piece_starts(self) -> tuple[int, ...]:
        """Where each span of each part begins in the window (samples): ``0`` first."""
        return tuple(w0 + s for w0, p in zip(self._offsets(), self.parts) for s in p.piece_starts())

    def part_bounds(self) -> tuple[tuple[int, int], ...]:
        """Each part's ``(start, end)`` in the window (samples), in order; the gaps lie between them."""
        return tuple((w0, w0 + p.samples) for w0, p in zip(self._offsets(), self.parts))

    def audio(self, audio: np.ndarray) -> np.ndarray:
        """The joined window's samples."""
        return with_gaps([p.audio(audio) for p in self.parts], self.gap)

    def place(self, start: int, end: int) -> tuple[int, int]:
        """A stretch of the window -> the file, inside the part it overlaps most (the first on a tie)."""
        placed = list(zip(self._offsets(), self.parts))
        # max() keeps the first of equal overlaps
        w0, part = max(placed, key=lambda wp: min(end, wp[0] + wp[1].samples) - max(start, wp[0]))
        a = min(max(start - w0, 0), part.samples)
        b = min(max(end - w0, a), part.samples)
        return part.place(a, b)

    def tail(self, sample: int) -> Packed | Joined | None:
        """What remains of the window after ``sample`` (window coordinates), or None."""
        rest: list[Packed] = []
        for w0, p in zip(self._offsets(), self.parts):
            if sample <= w0:
                rest.append(p)
            elif sample < w0 + p.samples:
                t = p.tail(sample - w0)
                if t is not None:
                    rest.append(t)
        if not rest:
            return None
        return rest[0] if len(rest) == 1 else Joined(tuple(rest), self.gap)


EncoderWindow = Packed | Joined
"""What one row of an encoder batch holds: packed neighbouring stretches, or joined distant ones."""


def join_windows(windows: Sequence[EncoderWindow]) -> EncoderWindow:
    """One :class:`Joined` window of ``windows`` (same file, same gap), parts in file order."""
    gaps = {w.gap for w in windows}
    if len(gaps) != 1:
        raise ValueError(f"cannot join windows with different gaps: {sorted(gaps)}")
    parts = sorted((p for w in windows for p in (w.parts if isinstance(w, Joined) else (w,))), key=lambda p: p.start)
    if any(a.spans[-1][1] > b.start for a, b in zip(parts, parts[1:])):
        raise ValueError("cannot join overlapping windows")
    return parts[0] if len(parts) == 1 else Joined(tuple(parts), gaps.pop())

def group_to_fill(windows: Sequence[EncoderWindow], *, max_samples: int) -> list[list[int]]:
    """Group windows so each group joined (:func:`join_windows`) fits in ``max_samples``.

    First-fit decreasing: fewest groups in practice, so the fewest encoder passes. Returns lists
    of indices into ``windows``, longest group first; a window too long to share stays alone.
    """
    order = sorted(range(len(windows)), key=lambda i: windows[i].samples, reverse=True)
    groups: list[list[int]] = []
    lengths: list[int] = []
    for i in order:
        w = windows[i]
        for g, used in enumerate(lengths):
            if windows[groups[g][0]].gap == w.gap and used + w.gap + w.samples <= max_samples:
                groups[g].append(i)
                lengths[g] = used + w.gap + w.samples
                break
        else:
            groups.append([i])
            lengths.append(w.samples)
    return groups
