"""Subtitle cues from a transcript: short enough to read, split at word boundaries.

A cue shows at most ``max_line_count`` lines of at most ``max_line_width`` characters (a word
longer than the width gets a line of its own; words are never cut) for at most
``max_cue_seconds``. Lines are filled greedily. When a segment has word timestamps, cues break
between words and take their times from the words (first word's start, last word's end), so a
long segment becomes several cues that each stay on screen while their words are spoken. Without
word times a segment is one cue if its text fits; otherwise its wrapped lines are cut into
consecutive cues and the segment's time is shared out in proportion to their characters -- an
ESTIMATE (speech rate is not constant), and the cue-duration limit cannot be enforced there.

Times are sanitised once (:func:`cue_times`): rounded to whole milliseconds FIRST, then clamped
to ``[0, duration]``, made monotonic (a cue never starts before the previous one ends) and
``end >= start``, so rounding can never produce an inverted cue. Word times are clamped into
their segment's sanitised interval the same way. Whitespace in text (incl. newlines, which would
end an SRT cue) is collapsed; segments with no text give no cue. Rendering (SRT/VTT syntax,
escaping) is :mod:`batch_job.writers`' job.

Cues never mix speakers. A cue's ``speaker`` is its words' speaker (a word without one takes its
segment's) or, without word times, its segment's; when a segment's words change speaker, a new
cue starts at every change, whatever room is left in the current one. The label is not part of
``lines`` and does not count against ``max_line_width``: the writers add it in front of the
first line (SRT ``[SPEAKER_00] ``) or as markup that takes no room (VTT ``<v SPEAKER_00>``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from batch_job.result import Segment, Transcript
from batch_job.settings import Settings

MAX_LINE_WIDTH = 42
"""Characters per line: the Netflix / BBC guideline for Latin scripts (fits a TV safe area)."""
MAX_LINE_COUNT = 2
"""Lines per cue: more covers the picture and cannot be read in time (Netflix, BBC, EBU)."""
MAX_CUE_SECONDS = 7.0
"""Seconds per cue: Netflix's maximum event duration; a longer cue is re-read or looks stuck."""
MS_PER_SECOND = 1000


@dataclass(frozen=True)
class CueOptions:
    """How cues are cut. ``word_level``: WebVTT karaoke tags per word (when words have times)."""

    max_line_width: int = MAX_LINE_WIDTH
    max_line_count: int = MAX_LINE_COUNT
    max_cue_seconds: float = MAX_CUE_SECONDS
    word_level: bool = False

    def __post_init__(self) -> None:
        if self.max_line_width < 1 or self.max_line_count < 1:
            raise ValueError(f"max_line_width and max_line_count must be >= 1, got {self.max_line_width}, {self.max_line_count}")
        if not (self.max_cue_seconds > 0):
            raise ValueError(f"max_cue_seconds must be > 0, got {self.max_cue_seconds}")

    @classmethod
    def from_settings(cls, settings: Settings) -> CueOptions:
        """The cue limits a job or the CLI was configured with; ``ValueError`` names a bad value."""
        return cls(settings.max_line_width, settings.max_line_count, settings.max_cue_seconds, settings.vtt_word_level)


@dataclass(frozen=True)
class CueWord:
    """A word of a cue: display text (no spaces around it), times in ms, and which line it is on."""

    text: str
    start_ms: int
    end_ms: int
    line: int = 0


@dataclass(frozen=True)
class Cue:
    """One subtitle: ``[start_ms, end_ms]`` and its lines (raw text, not escaped).

    ``words`` lists the cue's words with their times when the segment had word timestamps
    (their texts, space-joined per ``line``, are exactly ``lines``); empty otherwise.
    ``speaker`` is the one label of everything in the cue (raw, as the transcript has it), or
    ``None`` when not diarized.
    """

    start_ms: int
    end_ms: int
    lines: tuple[str, ...]
    words: tuple[CueWord, ...] = ()
    speaker: str | None = None

    @property
    def text(self) -> str:
        """The lines joined with newlines."""
        return "\n".join(self.lines)


def cues(transcript: Transcript, options: CueOptions | None = None) -> list[Cue]:
    """The cues of ``transcript``, in time order, non-overlapping, inside ``[0, duration]``."""
    opts = options or CueOptions()
    out: list[Cue] = []
    for seg, (start, end) in zip(transcript.segments, cue_times(transcript.segments, transcript.duration)):
        timed = _timed_words(seg, start, end)
        if timed:
            for speaker, words in _speaker_runs(timed):
                out.extend(_cues_from_words(words, opts, speaker))
        else:
            out.extend(_cues_from_text(seg.text.split(), start, end, opts, seg.speaker))
    return out


def cue_times(segments: Sequence[Segment], duration: float) -> list[tuple[int, int]]:
    """Sanitised ``(start_ms, end_ms)`` per segment: clamped to ``[0, duration]``, monotonic, end ≥ start.

    ``duration <= 0`` or non-finite means unknown: no upper clamp.
    """
    limit = to_ms(duration) if math.isfinite(duration) and duration > 0 else None
    out: list[tuple[int, int]] = []
    prev_end = 0
    for seg in segments:
        start, end = to_ms(seg.start), to_ms(seg.end)
        if limit is not None:
            start, end = min(start, limit), min(end, limit)
        start = max(start, prev_end)
        end = max(end, start)
        out.append((start, end))
        prev_end = end
    return out


def to_ms(seconds: float) -> int:
    """Whole milliseconds; negative or non-finite → 0."""
    if not math.isfinite(seconds) or seconds <= 0:
        return 0
    return int(round(seconds * MS_PER_SECOND))


def format_ms(ms: int, decimal: str) -> str:
    """``HH:MM:SS<decimal>mmm``; hours take more than two digits when needed (≥ 100 h)."""
    hours, rest = divmod(max(0, ms), 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    secs, millis = divmod(rest, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{decimal}{millis:03d}"


def wrap(words: Sequence[str], width: int) -> list[list[str]]:
    """Greedy line filling: ``words`` grouped into lines of at most ``width`` characters.

    A word longer than ``width`` gets a line to itself (never cut). Order is kept.
    """
    lines: list[list[str]] = []
    length = 0
    for word in words:
        if lines and length + 1 + len(word) <= width:
            lines[-1].append(word)
            length += 1 + len(word)
        else:
            lines.append([word])
            length = len(word)
    return lines


# --------------------------------------------------------------------------- helpers


def _timed_words(seg: Segment, start: int, end: int) -> list[tuple[CueWord, str | None]]:
    """The segment's words with text, times clamped into ``[start, end]`` ms, non-overlapping, in order.

    Each comes with its speaker: the word's own, else the segment's.
    """
    out: list[tuple[CueWord, str | None]] = []
    prev_end = start
    for w in seg.words:
        text = " ".join(w.word.split())
        if not text:
            continue
        w_start = max(min(max(to_ms(w.start), start), end), prev_end)
        w_end = min(max(to_ms(w.end), w_start), end)
        out.append((CueWord(text, w_start, w_end), w.speaker if w.speaker is not None else seg.speaker))
        prev_end = w_end
    return out


def _speaker_runs(timed: list[tuple[CueWord, str | None]]) -> list[tuple[str | None, list[CueWord]]]:
    """``timed`` cut into runs of consecutive words of one speaker, in order: no cue spans a change."""
    runs: list[tuple[str | None, list[CueWord]]] = []
    for word, speaker in timed:
        if runs and runs[-1][0] == speaker:
            runs[-1][1].append(word)
        else:
            runs.append((speaker, [word]))
    return runs


def _cues_from_words(words: list[CueWord], opts: CueOptions, speaker: str | None = None) -> list[Cue]:
    """Greedy: a word opens a new cue when it would need one line too many or stretch the cue too long."""
    max_ms = int(round(opts.max_cue_seconds * MS_PER_SECOND))
    out: list[Cue] = []
    current: list[CueWord] = []
    line_len = 0
    for w in words:
        fits = bool(current) and line_len + 1 + len(w.text) <= opts.max_line_width
        line = current[-1].line + (0 if fits else 1) if current else 0
        if current and (line >= opts.max_line_count or w.end_ms - current[0].start_ms > max_ms):
            out.append(_word_cue(current, speaker))
            current, fits, line = [], False, 0
        current.append(CueWord(w.text, w.start_ms, w.end_ms, line))
        line_len = line_len + 1 + len(w.text) if fits else len(w.text)
    if current:
        out.append(_word_cue(current, speaker))
    return out


def _word_cue(words: list[CueWord], speaker: str | None) -> Cue:
    lines = [" ".join(w.text for w in words if w.line == n) for n in range(words[-1].line + 1)]
    return Cue(start_ms=words[0].start_ms, end_ms=words[-1].end_ms, lines=tuple(lines), words=tuple(words), speaker=speaker)


def _cues_from_text(words: list[str], start: int, end: int, opts: CueOptions, speaker: str | None = None) -> list[Cue]:
    """One cue if the wrapped text fits, else consecutive cues timed in proportion to characters."""
    if not words:
        return []
    lines = [" ".join(line) for line in wrap(words, opts.max_line_width)]
    groups = [lines[i : i + opts.max_line_count] for i in range(0, len(lines), opts.max_line_count)]
    sizes = [sum(len(line) + 1 for line in group) for group in groups]  # +1: the space or break after each line
    total, done = sum(sizes), 0
    out = []
    for group, size in zip(groups, sizes):
        a = start + (end - start) * done // total
        done += size
        b = start + (end - start) * done // total
        out.append(Cue(start_ms=a, end_ms=b, lines=tuple(group), speaker=speaker))
    return out
