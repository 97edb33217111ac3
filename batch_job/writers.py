"""Output writers: a :class:`Transcript` as JSON, plain text, SubRip (SRT) and WebVTT.

Cue times are sanitised once (:func:`cue_times`): rounded to whole milliseconds FIRST, then
clamped to ``[0, duration]``, made monotonic (a cue never starts before the previous one ends)
and ``end >= start``, so rounding can never produce an inverted cue. Cue text is one line:
whitespace (incl. newlines, which would end an SRT cue) is collapsed; segments with no text are
left out of TXT/SRT/VTT (JSON keeps everything). ``-->`` in text is defused (SRT: ``->``;
VTT escapes ``&``, ``<``, ``>`` as the spec requires, so ``-->`` becomes ``--&gt;``).
Hours are written with at least two digits, more when needed (≥ 100 h).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from batch_job.fsutil import atomic_write_text
from batch_job.result import Segment, Transcript

FORMATS = ("json", "txt", "srt", "vtt")
"""Supported output formats (file extensions)."""


def render(transcript: Transcript, fmt: str, *, extra: Mapping[str, Any] | None = None) -> str:
    """The text of ``transcript`` in format ``fmt`` (one of :data:`FORMATS`).

    ``extra`` is merged into the JSON output's top level (its keys win over the transcript's);
    other formats ignore it. Non-finite floats in JSON become ``null``.
    Raises ``ValueError`` for an unknown format.
    """
    fmt = fmt.lower()
    if fmt == "json":
        return _render_json(transcript, extra)
    if fmt == "txt":
        return _render_txt(transcript)
    if fmt == "srt":
        return _render_srt(transcript)
    if fmt == "vtt":
        return _render_vtt(transcript)
    raise ValueError(f"unknown output format {fmt!r}; expected one of {', '.join(FORMATS)}")


def write_outputs(
    transcript: Transcript,
    out_dir: str | os.PathLike[str],
    stem: str,
    formats: Iterable[str],
    *,
    extra: Mapping[str, Any] | None = None,
) -> list[Path]:
    """Write ``out_dir/<stem>.<fmt>`` for each format, atomically (temp file + ``os.replace``).

    JSON, the completion marker, is written LAST. Every format is validated (and rendered)
    before anything is written. ``stem`` may contain ``/`` (sub-directories are created).
    Returns the written paths in write order.
    """
    wanted = _ordered_formats(formats)
    texts = [(fmt, render(transcript, fmt, extra=extra)) for fmt in wanted]
    base = Path(out_dir)
    written = []
    for fmt, text in texts:
        path = base / f"{stem}.{fmt}"
        atomic_write_text(path, text)
        written.append(path)
    return written


def format_timestamp(seconds: float, *, decimal: str = ",") -> str:
    """``HH:MM:SS,mmm`` (SRT, ``decimal=","``) or ``HH:MM:SS.mmm`` (VTT, ``decimal="."``)."""
    return _format_ms(_to_ms(seconds), decimal)


def cue_times(segments: Sequence[Segment], duration: float) -> list[tuple[int, int]]:
    """Sanitised ``(start_ms, end_ms)`` per segment: clamped to ``[0, duration]``, monotonic, end ≥ start.

    ``duration <= 0`` or non-finite means unknown: no upper clamp.
    """
    limit = _to_ms(duration) if math.isfinite(duration) and duration > 0 else None
    out: list[tuple[int, int]] = []
    prev_end = 0
    for seg in segments:
        start, end = _to_ms(seg.start), _to_ms(seg.end)
        if limit is not None:
            start, end = min(start, limit), min(end, limit)
        start = max(start, prev_end)
        end = max(end, start)
        out.append((start, end))
        prev_end = end
    return out


# --------------------------------------------------------------------------- renderers


def _render_json(transcript: Transcript, extra: Mapping[str, Any] | None) -> str:
    data = transcript.to_dict()
    if extra:
        data.update(extra)
    return json.dumps(_finite(data), ensure_ascii=False, indent=2, allow_nan=False) + "\n"


def _render_txt(transcript: Transcript) -> str:
    lines = [t for t in (_one_line(s.text) for s in transcript.segments) if t]
    return "".join(line + "\n" for line in lines)


def _render_srt(transcript: Transcript) -> str:
    blocks = []
    for number, (text, start, end) in enumerate(_cues(transcript), start=1):
        text = text.replace("-->", "->")
        blocks.append(f"{number}\n{_format_ms(start, ',')} --> {_format_ms(end, ',')}\n{text}\n")
    return "\n".join(blocks)


def _render_vtt(transcript: Transcript) -> str:
    blocks = ["WEBVTT\n"]
    for text, start, end in _cues(transcript):
        text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
        blocks.append(f"{_format_ms(start, '.')} --> {_format_ms(end, '.')}\n{text}\n")
    return "\n".join(blocks)


def _cues(transcript: Transcript) -> list[tuple[str, int, int]]:
    """(one-line text, start_ms, end_ms) for each segment with text."""
    times = cue_times(transcript.segments, transcript.duration)
    cues = []
    for seg, (start, end) in zip(transcript.segments, times):
        text = _one_line(seg.text)
        if text:
            cues.append((text, start, end))
    return cues


# --------------------------------------------------------------------------- helpers


def _to_ms(seconds: float) -> int:
    if not math.isfinite(seconds) or seconds <= 0:
        return 0
    return int(round(seconds * 1000.0))


def _format_ms(ms: int, decimal: str) -> str:
    hours, rest = divmod(max(0, ms), 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    secs, millis = divmod(rest, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{decimal}{millis:03d}"


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _finite(value: Any) -> Any:
    """A copy of a JSON-ready structure with NaN/inf floats replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _ordered_formats(formats: Iterable[str]) -> list[str]:
    """Validated, de-duplicated formats with ``json`` moved last."""
    wanted: list[str] = []
    for fmt in formats:
        fmt = fmt.strip().lower()
        if fmt not in FORMATS:
            raise ValueError(f"unknown output format {fmt!r}; expected one of {', '.join(FORMATS)}")
        if fmt not in wanted:
            wanted.append(fmt)
    if "json" in wanted:
        wanted.remove("json")
        wanted.append("json")
    return wanted
