"""Files in, :class:`~batch_job.result.Transcript` out: windows, batches, guards and segments.

The flow for every file: decode audio (:mod:`batch_job.audio`) -> cut into <= 30 s windows at
pauses (:mod:`batch_job.segment`) -> queue the windows. :class:`~batch_job.stream.TranscriptionStream`
fills fixed-size batches from the queue (across files), the engine runs the encoder once per batch
and the decoding loop (:mod:`batch_job.engine.decoding`) over the static KV cache; this module
says what each decoded window means:

* turns timestamp tokens into segments on the file's timeline;
* re-queues the unconsumed tail of a window when decoding stopped at a segment boundary before
  the window's end (openai/whisper's "seek", done batch-wise);
* re-queues a window at a higher temperature when its text loops (gzip compression ratio above
  the threshold) or its average log-probability is too low, keeping the best attempt;
* drops windows the model judges to hold no speech (no "Thank you." on silence);
* with word timestamps (the engine's step graphs return the alignment heads' attention), times
  each word of the window (:mod:`batch_job.alignment`) and maps it onto the file's timeline the
  way its segment is mapped (packed and joined windows included).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from batch_job.alignment import assign_words, find_alignment
from batch_job.audio import SAMPLE_RATE
from batch_job.constants import HOP_LENGTH, JOIN_SLACK_SECONDS, NO_SPACE_LANGUAGES, SECONDS_PER_TIMESTAMP
from batch_job.engine.decoding import DecodingOptions, DecodingResult, compression_ratio
from batch_job.result import FileResult, Segment, Transcript, Word
from batch_job.segment import FRAME_SECONDS, EncoderWindow, Joined, Packed, frame_energy_db, speech_extent
from batch_job.settings import Settings
from batch_job.shared_rows import join_row, split_row
from batch_job.stream import FileState, Piece, TranscriptionStream, WindowTask

if TYPE_CHECKING:  # pragma: no cover
    from batch_job.engine.runner import Engine
    from batch_job.speakers.diarize import Diarizer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Guards:
    """Thresholds of Whisper's failure-mode guards (openai/whisper's defaults)."""

    temperatures: tuple[float, ...] = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
    compression_ratio_threshold: float = 2.4
    logprob_threshold: float = -1.0
    no_speech_threshold: float = 0.6
    min_tail_seconds: float = 1.0
    """A window's undecoded tail shorter than this is not re-queued."""
    max_continuations: int = 4
    min_chars_per_second: float = 3.0
    """A segment longer than ``underread_seconds`` with less text than this per second (speech
    reads at 10-16) was under-read: Whisper skipped most of what was said (often after an abrupt
    change of voice or channel). It is decoded again in two halves, at most ``max_rereads`` deep.
    Languages written without spaces use a third of it."""
    underread_seconds: float = 8.0
    max_rereads: int = 2
    fallback_at_once: int = 5
    """Temperatures a failed window is decoded at together, in one batch (a row each, its audio
    encoded once), when it fails at the first: the first of them that passes is taken, as if
    they had run one after another (1: one after another, openai/whisper's way). A window that
    fails once usually fails again (unclear audio fails every temperature), and one after another
    each retry is a batch of its own that waits for the last."""


class _Span(NamedTuple):
    """A segment as decoded, in window terms: its text tokens and window seconds."""

    tokens: tuple[int, ...]
    start: float
    end: float


class Transcriber:
    """A loaded model ready to transcribe; load once, call many times."""

    def __init__(self, engine: Engine, settings: Settings, guards: Guards | None = None, *,
                 load_seconds: float = 0.0, diarizer: Diarizer | None = None) -> None:
        self.engine = engine
        self.settings = settings
        self.guards = guards or Guards()
        self.model_name = engine.model_name
        self.load_seconds = load_seconds
        """Wall-clock seconds the engine (and the voice encoder) took to load (0 when built by the caller)."""
        self.diarizer = diarizer
        """Labels speakers of each finished transcript (``None``: no labels, nothing loaded)."""

    @classmethod
    def load(cls, settings: Settings) -> Transcriber:
        """Load the model named by ``settings.model`` on ``settings.device`` (compiled graphs too), and the
        voice encoder when ``settings.diarize`` (ConfigError for bad speaker counts, before the model)."""
        from batch_job.engine.loading import load_engine
        from batch_job.speakers.options import SpeakerOptions

        SpeakerOptions.from_settings(settings)
        t0 = time.perf_counter()
        engine = load_engine(settings)
        diarizer = None
        if settings.diarize:
            from batch_job.speakers.diarize import Diarizer

            diarizer = Diarizer.from_settings(settings, device=engine.device)
        return cls(engine, settings, load_seconds=time.perf_counter() - t0, diarizer=diarizer)

    # ------------------------------------------------------------------ public API
    def transcribe(
        self,
        audio: np.ndarray | str | Path,
        *,
        language: str | None = None,
        task: str = "transcribe",
        progress: bool = False,
        on_window: Callable[[int, int], None] | None = None,
    ) -> Transcript:
        """Transcribe one file (path) or one 16 kHz mono float32 array. Raises AudioError on bad input."""
        name = str(audio) if not isinstance(audio, np.ndarray) else "<array>"
        (result,) = list(self.transcribe_many([(name, audio)], language=language, task=task, progress=progress, on_window=on_window))
        if result.error is not None:
            raise result.error
        assert result.transcript is not None
        return result.transcript

    def transcribe_many(
        self,
        inputs: Iterable[tuple[str, np.ndarray | str | Path]],
        *,
        language: str | None = None,
        task: str = "transcribe",
        progress: bool = False,
        on_window: Callable[[int, int], None] | None = None,
    ) -> Iterator[FileResult]:
        """Transcribe many inputs, batching windows ACROSS files; yields each file when it is done.

        Bad files yield a :class:`FileResult` with ``error`` set and never stop the others.
        Audio is loaded lazily, only as far ahead as needed to fill batches.
        """
        from batch_job.audio import load_audio

        options = self.options(language=language, task=task)
        sharing = self.settings is not None and self.settings.share_rows
        stream = TranscriptionStream(self, share_rows=self.shares_rows if sharing else None)
        source = iter(enumerate(inputs))
        exhausted = False
        bar = _progress_bar(progress)

        def admit() -> Iterator[FileResult]:
            nonlocal exhausted
            while not exhausted and stream.queued < stream.wanted:
                try:
                    idx, (name, item) = next(source)
                except StopIteration:
                    exhausted = True
                    return
                t0 = time.perf_counter()
                try:
                    audio = item if isinstance(item, np.ndarray) else load_audio(item, max_seconds=self.settings.max_audio_seconds)
                except Exception as exc:  # one bad file never stops the others
                    yield FileResult(name, None, exc)
                    continue
                done = stream.add(idx, name, audio, options, decode_audio_seconds=time.perf_counter() - t0)
                bar.total = stream.total_windows
                bar.refresh()
                if done is not None:
                    yield done

        yield from admit()
        while stream.queued:
            before = stream.done_windows
            finished, _ = stream.step()
            bar.total = stream.total_windows
            bar.update(stream.done_windows - before)
            if on_window is not None:
                for done in range(before + 1, stream.done_windows + 1):
                    on_window(done, stream.total_windows)
            for _, result in finished:
                yield result
            yield from admit()
        bar.close()

    def options(self, *, language: str | None = None, task: str = "transcribe") -> DecodingOptions:
        """Validated decoding options for this model. Raises ``ValueError`` on a bad task or language."""
        if task not in ("transcribe", "translate"):
            raise ValueError(f"task must be 'transcribe' or 'translate', not {task!r}")
        if task == "translate" and not self.engine.tokens.is_multilingual:
            raise ValueError(f"model {self.model_name} is English-only: it cannot translate")
        if language is not None:
            language = self.engine.check_language(language)
        return DecodingOptions(task=task, language=language, max_new_tokens=self.engine.max_new_tokens)

    # ------------------------------------------------------------------ windows (stream.WindowHandler)
    @property
    def batch_size(self) -> int:
        return self.engine.max_batch

    def shares_rows(self, options: DecodingOptions) -> bool:
        """Whether windows of different files may share an encoder row under ``options``: only where
        the row's language is every window's (fixed, or an English-only model) and without word
        timestamps (:mod:`batch_job.shared_rows`)."""
        known_language = options.language is not None or not self.engine.tokens.is_multilingual
        return known_language and not (self.settings is not None and self.settings.word_timestamps)

    def decode_windows(self, tasks: Sequence[WindowTask], files: Mapping[Hashable, FileState], options: DecodingOptions,
                       rows: Sequence[tuple[int, ...]] | None = None) -> list[tuple[DecodingResult, ...] | None]:
        rows = rows or [(i,) for i in range(len(tasks))]
        audio = [[tasks[i].window.audio(files[tasks[i].file].audio) for i in row] for row in rows]
        row_audio = [parts[0] if len(parts) == 1 else join_row(parts) for parts in audio]
        # A task of several attempts (WindowTask.fan; never in a shared row) takes a batch row per
        # temperature, each the SAME array: the engine encodes it once.
        batch_rows, temps, owner = [], [], []
        for r, (row, row_samples) in enumerate(zip(rows, row_audio)):
            first = tasks[row[0]]
            for j in range(first.fan):
                batch_rows.append(row_samples)
                temps.append(self.guards.temperatures[first.attempt + j])
                owner.append(r)
        decoded, timings = self.engine.decode(batch_rows, options, temperatures=temps)
        by_row: list[list[DecodingResult]] = [[] for _ in rows]
        for r, result in zip(owner, decoded):
            by_row[r].append(result)
        results: list[tuple[DecodingResult, ...] | None] = [None] * len(tasks)
        for row, parts, got in zip(rows, audio, by_row):
            if len(row) == 1:
                results[row[0]] = tuple(got)
                continue
            split = split_row(got[0], [len(p) for p in parts], timestamp_begin=self.engine.tokens.timestamp_begin,
                              speech=[speech_extent(p) for p in parts])
            for i, part in zip(row, split):
                results[i] = None if part is None else (part,)
        share = 1.0 / len(tasks)
        for t in tasks:
            for k, v in timings.items():
                files[t.file].timings[k] += v * share
        return results

    def accept_window(self, task: WindowTask, result: DecodingResult, state: FileState) -> tuple[WindowTask, ...]:
        """Record a window's result; return its follow-ups (a retry, a tail, or its parts again), ``()`` when done."""
        g = self.guards
        text = self.engine.text(result.tokens)
        ratio = compression_ratio(text)
        no_speech = result.no_speech_prob > g.no_speech_threshold and result.avg_logprob < g.logprob_threshold
        if no_speech:
            return ()
        failed = ratio > g.compression_ratio_threshold or result.avg_logprob < g.logprob_threshold
        if failed and task.attempt + 1 < len(g.temperatures):
            best = task.best
            if best is None or ratio < best[1]:
                best = (result, ratio)
            attempt = task.attempt + 1
            fan = max(1, min(g.fallback_at_once, len(g.temperatures) - attempt))
            return (replace(task, attempt=attempt, best=best, fan=fan),)
        if failed and task.best is not None and task.best[1] < ratio:
            result, ratio = task.best
        spans, consumed = self._split_by_timestamps(result, task)
        crossing = _first_join_crossing(task.window, spans)
        if crossing is not None:
            resume = int(round(spans[crossing].start * SAMPLE_RATE))
            if resume <= 0 or not any(s.tokens for s in spans[:crossing]):
                # The window's first segment ran across a join: nothing of it can be placed. The
                # parts it touched are decoded again in rows of their own, never joined again;
                # the others go back to the queue as they were (they may be joined again).
                assert isinstance(task.window, Joined)
                touched = _parts_touched(task.window, spans[crossing])
                return tuple(WindowTask(task.file, part, continuation=task.continuation, alone=k in touched)
                             for k, part in enumerate(task.window.parts))
            spans, consumed = spans[:crossing], resume
        halves = self._reread_underread(task, spans, result.language, state)
        if halves is not None:  # the spans before the under-read one are kept; the rest read again
            kept, follow_ups = halves
            spans, consumed = spans[:kept], 0
        segments, consumed = self._segments(result, task, spans, consumed)
        if ratio > g.compression_ratio_threshold:
            segments = _drop_repeats(segments)
        state.segments.extend(segments)
        state.languages.append(result.language)
        if halves is not None:
            return follow_ups
        tail = task.window.tail(consumed) if consumed > 0 else None
        if tail is None:
            return ()
        if consumed in task.window.piece_starts()[1:]:
            # Decoding resumes at a piece nothing was decoded from (_resume_at_unheard_piece):
            # always go on, whatever its length and the continuation budget (each such tail
            # drops at least one piece, so this ends).
            return (WindowTask(task.file, tail, continuation=task.continuation),)
        if crossing is not None or (tail.samples >= g.min_tail_seconds * SAMPLE_RATE
                                    and task.continuation < g.max_continuations):
            return (WindowTask(task.file, tail, continuation=task.continuation + 1),)
        return ()

    def _reread_underread(self, task: WindowTask, spans: Sequence[_Span], language: str,
                          state: FileState) -> tuple[int, tuple[WindowTask, ...]] | None:
        """``(spans kept, follow-ups)`` when a span was under-read (:attr:`Guards.min_chars_per_second`), else None.

        The spans before it are kept; the window from its start is decoded again as two windows,
        cut at the quietest 10 ms near the middle of the span, each in a row of its own (never
        joined), split again at most ``max_rereads`` deep. Packed windows only (a joined window's
        parts are short).
        """
        g = self.guards
        if task.rereads >= g.max_rereads or not isinstance(task.window, Packed):
            return None
        rate = g.min_chars_per_second / (3 if language in NO_SPACE_LANGUAGES else 1)
        for i, span in enumerate(spans):
            seconds = span.end - span.start
            if seconds < g.underread_seconds or len(self.engine.text(span.tokens).strip()) >= rate * seconds:
                continue
            start, end = int(round(span.start * SAMPLE_RATE)), int(round(span.end * SAMPLE_RATE))
            cut = _quietest(task.window.audio(state.audio), start + (end - start) // 3, end - (end - start) // 3)
            head, tail = task.window.head(cut), task.window.tail(cut)
            if head is not None and start > 0:
                head = head.tail(start)
            halves = tuple(WindowTask(task.file, w, continuation=task.continuation, alone=True, rereads=task.rereads + 1)
                           for w in (head, tail) if w is not None)
            return i, halves
        return None

    def _segments(self, result: DecodingResult, task: WindowTask, spans: Sequence[_Span],
                  consumed: int) -> tuple[list[Piece], int]:
        """Decoded spans -> segments in file seconds; also the window sample up to which it is consumed."""
        window = task.window
        consumed = _resume_at_unheard_piece(window, spans, consumed)
        words = self._word_times(result, task, spans) if result.alignment is not None else None
        out: list[Piece] = []
        for i, span in enumerate(spans):
            text = self.engine.text(span.tokens).strip()
            if not text:
                continue
            start, end = _place_seconds(window, span.start, span.end)
            placed = _place_words(words[i], window, start, end) if words is not None else ()
            out.append(Piece(start, end, text, window.start, placed))
        return out, consumed

    def _split_by_timestamps(self, result: DecodingResult, task: WindowTask) -> tuple[list[_Span], int]:
        """The window's segments as decoded (window seconds, clamped to the window), in order, and
        the window sample up to which it is consumed. Text after the last complete segment of a
        window that stopped at a segment boundary is left out (its tail is decoded again)."""
        tb = self.engine.tokens.timestamp_begin
        eot = self.engine.tokens.eot
        toks = list(result.tokens)
        window_s = task.samples / SAMPLE_RATE
        is_ts = [t >= tb for t in toks]
        boundaries = [i for i in range(1, len(toks)) if is_ts[i] and is_ts[i - 1]]
        single_ending = len(toks) >= 2 and is_ts[-1] and not is_ts[-2]
        spans: list[_Span] = []

        def add(piece: list[int], start_s: float, end_s: float) -> None:
            start_s = min(max(start_s, 0.0), window_s)
            end_s = min(max(end_s, start_s), window_s)
            spans.append(_Span(tuple(t for t in piece if t < eot), start_s, end_s))

        if boundaries:
            cuts = boundaries + ([len(toks)] if single_ending else [])
            last = 0
            for cut in cuts:
                piece = toks[last:cut]
                add(piece, (piece[0] - tb) * SECONDS_PER_TIMESTAMP, (piece[-1] - tb) * SECONDS_PER_TIMESTAMP)
                last = cut
            if single_ending:
                return spans, task.samples
            # Decoding stopped at a segment boundary (or ran out of tokens mid-segment): the
            # window is consumed up to the last complete segment; the tail gets decoded again.
            seek = (toks[last - 1] - tb) * SECONDS_PER_TIMESTAMP
            return spans, int(round(min(seek, window_s) * SAMPLE_RATE))
        stamps = [t for t in toks if t >= tb]
        end_s = window_s
        if stamps and stamps[-1] != tb:
            end_s = (stamps[-1] - tb) * SECONDS_PER_TIMESTAMP
        start_s = (stamps[0] - tb) * SECONDS_PER_TIMESTAMP if stamps else 0.0
        add(toks, start_s, end_s)
        return spans, task.samples

    def _word_times(self, result: DecodingResult, task: WindowTask, spans: Sequence[_Span]) -> list[tuple[Word, ...]]:
        """Each span's words in WINDOW seconds, from the alignment heads' attention of the result.

        The whole window's text tokens are aligned at once (DTW needs the sequence), then dealt to
        the spans in order by token count (openai's ``add_word_timestamps``).
        """
        assert result.alignment is not None
        eot = self.engine.tokens.eot
        text_at = [i for i, t in enumerate(result.tokens) if t < eot]
        if not text_at:
            return [() for _ in spans]
        attention = result.alignment  # [A, n, S]: row i chose tokens[i], row len(tokens) chose eot
        rows = [min(i, attention.shape[1] - 1) for i in [*text_at, len(result.tokens)]]
        timings = find_alignment(
            attention[:, rows, :],
            [result.tokens[i] for i in text_at],
            [math.exp(result.token_logprobs[i]) for i in text_at],
            num_frames=task.samples // HOP_LENGTH,
            decode=self.engine.text,
            no_space=result.language in NO_SPACE_LANGUAGES,
        )
        per_span, _ = assign_words(timings, [s.tokens for s in spans], [(s.start, s.end) for s in spans], last_speech=0.0)
        return [tuple(Word(w.word, w.start, w.end, round(w.probability, 4)) for w in seg.words) for seg in per_span]

    def finish_file(self, state: FileState) -> FileResult:
        options = state.options
        duration = len(state.audio) / SAMPLE_RATE
        ordered = sorted(state.segments, key=lambda s: (s.start, s.order))
        # A segment ends no later than the next one starts: one that ran across the gap between
        # two joined, distant stretches of the file is cut there, instead of pushing the start
        # of everything in between.
        next_starts = [s.start for s in ordered[1:]] + [duration]
        segments: list[Segment] = []
        for piece, next_start in zip(ordered, next_starts):
            end = min(piece.end, max(next_start, piece.start))
            start = round(min(max(piece.start, segments[-1].end if segments else 0.0), duration), 3)
            end = round(min(max(end, start), duration), 3)
            segments.append(Segment(start=start, end=end, text=piece.text, words=_clamp_words(piece.words, start, end)))
        language = options.language or (max(set(state.languages), key=state.languages.count) if state.languages else "en")
        joiner = "" if language in NO_SPACE_LANGUAGES else " "
        transcript = Transcript(
            text=joiner.join(s.text for s in segments),
            language=language,
            duration=round(duration, 3),
            segments=tuple(segments),
            model=self.model_name,
            task=options.task,
            timings={k: round(v, 4) for k, v in state.timings.items()},
        )
        if self.diarizer is not None:
            t0 = time.perf_counter()
            transcript = self.diarizer.label(transcript, state.audio)
            transcript = replace(transcript, timings={**transcript.timings, "diarize": round(time.perf_counter() - t0, 4)})
        return FileResult(state.name, transcript, None)


def _quietest(audio: np.ndarray, start: int, end: int) -> int:
    """The start of the quietest 10 ms frame of ``audio[start:end]`` (samples): where a cut splits no word."""
    frame = int(round(FRAME_SECONDS * SAMPLE_RATE))
    if end - start < 2 * frame:
        return (start + end) // 2
    return start + int(np.argmin(frame_energy_db(audio[start:end], frame))) * frame


def _parts_touched(window: Joined, span: _Span) -> set[int]:
    """The parts of ``window`` that ``span`` overlaps by more than ``JOIN_SLACK_SECONDS``."""
    slack = JOIN_SLACK_SECONDS * SAMPLE_RATE
    a, b = span.start * SAMPLE_RATE, span.end * SAMPLE_RATE
    return {k for k, (start, end) in enumerate(window.part_bounds()) if min(b, end) - max(a, start) > slack}


def _first_join_crossing(window: EncoderWindow, spans: Sequence[_Span]) -> int | None:
    """Index of the first span of a joined window that ran across a join, or None.

    The parts of a :class:`~batch_job.segment.Joined` window lie far apart in the file; a segment
    that overlaps two of them by more than ``JOIN_SLACK_SECONDS`` each holds text of both, and
    placed in one part (:meth:`~batch_job.segment.Joined.place`) it would drop the other's text
    from the file's timeline. Spans without text are passed over.
    """
    if not isinstance(window, Joined):
        return None
    for i, span in enumerate(spans):
        if span.tokens and len(_parts_touched(window, span)) > 1:
            return i
    return None


def _resume_at_unheard_piece(window: EncoderWindow, spans: Sequence[_Span], consumed: int) -> int:
    """Where decoding of ``window`` goes on: ``consumed``, or earlier, at the first piece that
    starts after the decoded text ended.

    A packed or joined window holds several stretches of speech with short silences between
    them. Whisper often ends its output (``<|endoftext|>``) after the first of two unrelated
    utterances, which would mark the whole window consumed and lose the others; those pieces
    are decoded again, as a tail, instead.
    """
    said = [s for s in spans if s.tokens]
    said_until = int(round(said[-1].end * SAMPLE_RATE)) if said else 0
    unheard = [start for start in window.piece_starts()[1:] if start >= said_until]
    if unheard and (consumed <= 0 or consumed > unheard[0]):
        return unheard[0]
    return consumed


def _drop_repeats(segments: list[Piece]) -> list[Piece]:
    """Cut a repetition loop: keep the first of consecutive segments with the same text."""
    out: list[Piece] = []
    for seg in segments:
        if out and out[-1].text.lower() == seg.text.lower():
            continue
        out.append(seg)
    return out


def _place_words(words: Sequence[Word], window: EncoderWindow, start: float, end: float) -> tuple[Word, ...]:
    """Words in window seconds -> file seconds, through the window's own mapping, inside ``[start, end]``.

    A packed window maps each word through its spans (a word in an inserted gap lands at the end
    of the span before it); a joined window could place a word in another part than its segment,
    so words are clamped into the segment's file interval, which keeps them in the right part.
    """
    placed = [Word(w.word, *_place_seconds(window, w.start, w.end), w.probability) for w in words]
    return _clamp_words(placed, start, end)


def _place_seconds(window: EncoderWindow, start: float, end: float) -> tuple[float, float]:
    """A stretch of ``window`` in window seconds -> the same stretch in file seconds (:meth:`place`)."""
    a, b = window.place(int(round(start * SAMPLE_RATE)), int(round(end * SAMPLE_RATE)))
    return a / SAMPLE_RATE, b / SAMPLE_RATE


def _clamp_words(words: Sequence[Word], start: float, end: float) -> tuple[Word, ...]:
    """``words`` inside ``[start, end]``, monotonic (each starts no earlier than the previous ends), ms-rounded."""
    out: list[Word] = []
    floor = start
    for w in words:
        a = round(min(max(w.start, floor), end), 3)
        b = round(min(max(w.end, a), end), 3)
        out.append(Word(w.word, a, b, w.probability))
        floor = b
    return tuple(out)


class _NullBar:
    total = 0

    def update(self, n: int = 1) -> None: ...

    def refresh(self) -> None: ...

    def close(self) -> None: ...


def _progress_bar(enabled: bool):
    if not enabled:
        return _NullBar()
    from tqdm import tqdm

    return tqdm(total=0, unit="window", desc="transcribing", dynamic_ncols=True, leave=False)
