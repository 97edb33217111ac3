"""Output writers: a :class:`Transcript` as JSON, plain text, SubRip (SRT) and WebVTT.

SRT and VTT render the cues of :func:`batch_job.subtitles.cues` (at most ``max_line_count``
lines of ``max_line_width`` characters, cut at word boundaries; see :class:`CueOptions`), whose
times are sanitised once (:func:`cue_times`: whole milliseconds first, clamped to
``[0, duration]``, monotonic, never inverted). Whitespace in text (incl. newlines, which would
end an SRT cue) is collapsed; a cue's lines are joined with ``\n``; segments with no text are
left out of TXT/SRT/VTT (JSON keeps everything, and lists ``words`` only for segments that have
them). ``-->`` in text is defused (SRT: ``->``; VTT escapes ``&``, ``<``, ``>`` as the spec
requires, so ``-->`` becomes ``--&gt;``). With ``CueOptions(word_level=True)`` a VTT cue with
word times carries a ``<HH:MM:SS.mmm>`` timestamp tag before each word after the first
(karaoke-style), kept strictly inside the cue and increasing as the spec requires.
Hours are written with at least two digits, more when needed (≥ 100 h).

Speaker labels (a diarized transcript; see :mod:`batch_job.result`). Without labels every
format is exactly what it was before labels existed. With them:

- JSON: ``"speaker"`` on each labelled segment and word, ``"speakers"`` (order of first
  appearance) on the transcript.
- TXT: one line per speaker TURN, ``SPEAKER_00: text``: consecutive segments of the same speaker
  joined with a space. A segment without a label keeps a line of its own with no prefix.
- SRT: ``[SPEAKER_00] `` before the first line of each cue of that speaker. The prefix does NOT
  count against ``max_line_width`` (the limit is about the words; the prefix is 13 characters of
  a known shape, and cutting text earlier to make room would change the cues' timing).
- VTT: a WebVTT voice span, ``<v SPEAKER_00>`` at the start of the cue text, before any
  karaoke tags. Its ``</v>`` is left out: the spec allows that when the voice span is the cue
  text's only component, which it is (the words and timestamp tags are inside it). In the label
  ``&``, ``<`` and ``>`` are escaped (the spec's annotation excludes ``&`` and ``>``).

Cues never mix speakers (:func:`batch_job.subtitles.cues` breaks at every change). Labels are
written with their whitespace collapsed (a newline would end a cue or a TXT line); a label that
is blank after that is treated as no label.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from batch_job.fsutil import atomic_write_text
from batch_job.result import Transcript
from batch_job.subtitles import Cue, CueOptions, cue_times, cues, format_ms, to_ms

__all__ = ["FORMATS", "CueOptions", "cue_times", "format_timestamp", "render", "write_outputs"]

FORMATS = ("json", "txt", "srt", "vtt")
"""Supported output formats (file extensions)."""


def render(
    transcript: Transcript,
    fmt: str,
    *,
    extra: Mapping[str, Any] | None = None,
    cue_options: CueOptions | None = None,
) -> str:
    """The text of ``transcript`` in format ``fmt`` (one of :data:`FORMATS`).

    ``extra`` is merged into the JSON output's top level (its keys win over the transcript's);
    other formats ignore it. Non-finite floats in JSON become ``null``. ``cue_options`` shapes
    SRT/VTT cues (``None``: the :class:`CueOptions` defaults). Raises ``ValueError`` for an
    unknown format.
    """
    fmt = fmt.lower()
    if fmt == "json":
        return _render_json(transcript, extra)
    if fmt == "txt":
        return _render_txt(transcript)
    opts = cue_options or CueOptions()
    if fmt == "srt":
        return _render_srt(cues(transcript, opts))
    if fmt == "vtt":
        return _render_vtt(cues(transcript, opts), word_level=opts.word_level)
    raise ValueError(f"unknown output format {fmt!r}; expected one of {', '.join(FORMATS)}")


def write_outputs(
    transcript: Transcript,
    out_dir: str | os.PathLike[str],
    stem: str,
    formats: Iterable[str],
    *,
    extra: Mapping[str, Any] | None = None,
    cue_options: CueOptions | None = None,
) -> list[Path]:
    """Write ``out_dir/<stem>.<fmt>`` for each format, atomically (temp file + ``os.replace``).

    JSON, the completion marker, is written LAST. Every format is validated (and rendered)
    before anything is written. ``stem`` may contain ``/`` (sub-directories are created).
    ``extra`` and ``cue_options`` are passed to :func:`render`. Returns the written paths in
    write order.
    """
    wanted = _ordered_formats(formats)
    texts = [(fmt, render(transcript, fmt, extra=extra, cue_options=cue_options)) for fmt in wanted]
    base = Path(out_dir)
    written = []
    for fmt, text in texts:
        path = base / f"{stem}.{fmt}"
        atomic_write_text(path, text)
        written.append(path)
    return written


def format_timestamp(seconds: float, *, decimal: str = ",") -> str:
    """``HH:MM:SS,mmm`` (SRT, ``decimal=","``) or ``HH:MM:SS.mmm`` (VTT, ``decimal="."``)."""
    return format_ms(to_ms(seconds), decimal)


# --------------------------------------------------------------------------- renderers


def _render_json(transcript: Transcript, extra: Mapping[str, Any] | None) -> str:
    data = transcript.to_dict()
    if extra:
        data.update(extra)
    return json.dumps(_finite(data), ensure_ascii=False, indent=2, allow_nan=False) + "\n"


def _render_txt(transcript: Transcript) -> str:
    """One line per segment; with labels, one ``LABEL: text`` line per speaker turn."""
    turns: list[tuple[str | None, list[str]]] = []
    for seg in transcript.segments:
        text, speaker = _one_line(seg.text), _label(seg.speaker)
        if not text:
            continue
        if speaker is not None and turns and turns[-1][0] == speaker:
            turns[-1][1].append(text)
        else:
            turns.append((speaker, [text]))
    lines = [" ".join(texts) if speaker is None else f"{speaker}: {' '.join(texts)}" for speaker, texts in turns]
    return "".join(line + "\n" for line in lines)


def _render_srt(cue_list: list[Cue]) -> str:
    blocks = []
    for number, cue in enumerate(cue_list, start=1):
        speaker = _label(cue.speaker)
        lines = list(cue.lines)
        if speaker is not None:
            lines[0] = f"[{speaker}] {lines[0]}"
        text = "\n".join(line.replace("-->", "->") for line in lines)
        blocks.append(f"{number}\n{format_ms(cue.start_ms, ',')} --> {format_ms(cue.end_ms, ',')}\n{text}\n")
    return "\n".join(blocks)


def _render_vtt(cue_list: list[Cue], *, word_level: bool) -> str:
    blocks = ["WEBVTT\n"]
    for cue in cue_list:
        text = _vtt_word_text(cue) if word_level and cue.words else "\n".join(_vtt_escape(line) for line in cue.lines)
        speaker = _label(cue.speaker)
        if speaker is not None:
            text = f"<v {_vtt_escape(speaker)}>{text}"
        blocks.append(f"{format_ms(cue.start_ms, '.')} --> {format_ms(cue.end_ms, '.')}\n{text}\n")
    return "\n".join(blocks)


def _vtt_word_text(cue: Cue) -> str:
    """Escaped cue text with a ``<timestamp>`` before each word after the first.

    A tag is written only when strictly after the cue start and the previous tag and strictly
    before the cue end (WebVTT's rule); otherwise that word is highlighted with the one before.
    """
    lines: list[list[str]] = [[] for _ in cue.lines]
    last = cue.start_ms
    for index, word in enumerate(cue.words):
        piece = _vtt_escape(word.text)
        if index > 0 and last < word.start_ms < cue.end_ms:
            piece = f"<{format_ms(word.start_ms, '.')}>{piece}"
            last = word.start_ms
        lines[word.line].append(piece)
    return "\n".join(" ".join(line) for line in lines)


def _vtt_escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


# --------------------------------------------------------------------------- helpers


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _label(speaker: str | None) -> str | None:
    """A speaker label as written: whitespace collapsed; ``None`` when unset or blank."""
    label = _one_line(speaker) if speaker is not None else ""
    return label or None


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
