"""Windows of many files through one engine: the cross-file batch scheduler.

:class:`TranscriptionStream` keeps every file in flight (:class:`FileState`) and a queue of
encoder windows (:class:`WindowTask`), and fills the engine's fixed-shape batches from it, one
batch per :meth:`~TranscriptionStream.step`. What a decoded window means (segments, retries,
tails) is the transcriber's business (:class:`WindowHandler`, implemented by
:class:`batch_job.transcribe.Transcriber`); this module only decides which windows share a batch.
Both the Batch job (a known list of files, :meth:`Transcriber.transcribe_many`) and the server
(requests arriving while others decode, :mod:`batch_job.serve.scheduler`) drive it.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import NamedTuple, Protocol

import numpy as np

from batch_job.audio import SAMPLE_RATE
from batch_job.constants import CHUNK_SECONDS
from batch_job.engine.decoding import DecodingOptions, DecodingResult
from batch_job.result import FileResult, Word
from batch_job.segment import EncoderWindow, group_to_fill, join_windows, pack_windows, split_at_pauses
from batch_job.shared_rows import ROW_MAX_PARTS, ROW_MAX_TRIES, plan_rows

log = logging.getLogger(__name__)

WINDOW_SECONDS = CHUNK_SECONDS
PAUSE_SECONDS = 0.6
"""Pauses at least this long split speech into pieces that are then packed into windows."""
PACK_GAP_SECONDS = 0.4
"""Silence kept between packed pieces (longer pauses are shortened to this)."""
ORDERS = ("longest", "fair")
"""How :class:`TranscriptionStream` picks a batch's rows (see there)."""


class Piece(NamedTuple):
    """A decoded segment on the file's timeline, before the file is finished."""

    start: float
    end: float
    text: str
    order: int  # the window's first sample: ties between equal starts keep window order
    words: tuple[Word, ...] = ()


@dataclass
class WindowTask:
    """One encoder window (or the tail of one) waiting to be decoded."""

    file: Hashable  # the key of its file in the TranscriptionStream
    window: EncoderWindow  # stretches of the file (samples) decoded as one <= 30 s window
    attempt: int = 0  # index into Guards.temperatures
    continuation: int = 0
    best: tuple[DecodingResult, float] | None = None  # best failed attempt and its compression ratio
    alone: bool = False  # decoded in a row of its own: never joined, never in a shared row (rows passed it over, or a join failed)
    missed_rows: tuple[int, ...] = ()  # shared rows that passed it over (shared_rows.ROW_MAX_TRIES); it never meets their windows again
    rereads: int = 0  # times its audio was split as under-read (Guards.min_chars_per_second); at most Guards.max_rereads
    fan: int = 1  # attempts decoded at once, in a row each: ``attempt .. attempt + fan - 1`` (a temperature fallback in one batch)

    @property
    def samples(self) -> int:
        return self.window.samples


@dataclass
class FileState:
    """A file in flight: its audio, decoding options, windows not yet done and what they gave."""

    name: str
    audio: np.ndarray
    pending: int = 0
    segments: list[Piece] = field(default_factory=list)
    languages: list[str] = field(default_factory=list)
    options: DecodingOptions = field(default_factory=DecodingOptions)
    timings: dict[str, float] = field(default_factory=lambda: defaultdict(float))


class WindowHandler(Protocol):
    """What the stream asks of a transcriber (:class:`batch_job.transcribe.Transcriber`)."""

    @property
    def batch_size(self) -> int:
        """Rows of the engine's largest batch."""
        ...

    def decode_windows(self, tasks: Sequence[WindowTask], files: Mapping[Hashable, FileState],
                       options: DecodingOptions, rows: Sequence[tuple[int, ...]] | None = None,
                       ) -> list[tuple[DecodingResult, ...] | None]:
        """Decode ``tasks`` as one batch; per task, its attempts' results in order (``task.fan`` of them).

        ``rows`` (only from a stream that shares rows): which tasks share each encoder row
        (:mod:`batch_job.shared_rows`); ``None`` = a row per task. Either way the batch holds at
        most ``batch_size`` rows, a task of ``fan`` attempts taking ``fan`` of them. A task's
        result is ``None`` when its shared row did not decode it: the stream queues it again, for
        another shared row without that row's windows, or alone once
        :data:`~batch_job.shared_rows.ROW_MAX_TRIES` rows passed it over.
        """
        ...

    def accept_window(self, task: WindowTask, result: DecodingResult, state: FileState) -> tuple[WindowTask, ...]:
        """Record a window's result in ``state``; return its follow-ups (a retry: the same window at
        ``attempt + 1``; a tail; or the parts of a joined window to decode alone), ``()`` when the
        window is done."""
        ...

    def finish_file(self, state: FileState) -> FileResult:
        """The file's transcript from its accepted windows."""
        ...


@dataclass(frozen=True)
class BatchReport:
    """What one engine batch held: ``rows`` windows of ``batch_size``, from the files ``keys``."""

    rows: int
    batch_size: int
    keys: tuple[Hashable, ...]

    @property
    def fill(self) -> float:
        """Share of the batch's rows that held a window (the rest is padding)."""
        return self.rows / self.batch_size


class TranscriptionStream:
    """Files in flight through one engine: add files at any time, decode one batch per :meth:`step`.

    The one cross-file scheduler: :meth:`~batch_job.transcribe.Transcriber.transcribe_many` drives it over a list of
    files, the server's request scheduler over requests that arrive while others decode. Windows
    of every file in flight share the engine's fixed-shape batches; files with different decoding
    options (task, language) never share one. ``order`` picks a batch's rows:

    * ``"longest"`` (files known up front): longest windows first, so the rows of a batch need
      similar numbers of decoder steps;
    * ``"fair"`` (files that keep arriving): round robin over files in the order they came, so a
      long file's windows cannot hold back a short file that arrived after it.

    ``isolate_failures``: a batch whose decoding raises fails only the files it held (their
    results carry the error) instead of raising out of :meth:`step`.

    ``share_rows``: for which decoding options short first-attempt windows of different files
    may share one encoder row (:mod:`batch_job.shared_rows`); ``None`` = never (the server: rows
    are never shared between requests).
    """

    def __init__(self, handler: WindowHandler, *, order: str = "longest", isolate_failures: bool = False,
                 share_rows: Callable[[DecodingOptions], bool] | None = None) -> None:
        if order not in ORDERS:
            raise ValueError(f"order must be 'longest' or 'fair', not {order!r}")
        self._handler = handler
        self._order = order
        self._isolate = isolate_failures
        self._share_rows = share_rows
        self._rows_planned = 0  # shared rows so far: each one's id (WindowTask.missed_rows)
        self._files: dict[Hashable, FileState] = {}
        self._queue: list[WindowTask] = []
        self.batch_size = handler.batch_size
        self.done_windows = 0
        """Windows decoded for good (a window that left a tail counts; one sent back for a retry does not yet)."""
        self.total_windows = 0
        """Windows known so far: grows with tails, shrinks when short windows are joined."""

    @property
    def queued(self) -> int:
        """Windows waiting to be decoded."""
        return len(self._queue)

    @property
    def wanted(self) -> int:
        """Windows worth having queued before a step: enough to fill every row of a batch."""
        return self.batch_size * (ROW_MAX_PARTS if self._share_rows is not None else 1)

    def add(self, key: Hashable, name: str, audio: np.ndarray, options: DecodingOptions, *,
            decode_audio_seconds: float = 0.0) -> FileResult | None:
        """Queue a file's windows (``audio``: float32 ``[n]`` at 16 kHz). ``key`` must be unique while in flight.

        Returns the file's result at once when it holds no speech (no windows), else ``None``.
        """
        if key in self._files:
            raise ValueError(f"file key {key!r} is already in flight")
        state = FileState(name=name, audio=np.ascontiguousarray(audio, dtype=np.float32), options=options)
        t0 = time.perf_counter()
        # Short stretches of speech between long silences share one encoder window.
        # (measured on 681 s of joined clips: 25 windows instead of 28, ~12% less
        # encoder work, same WER; see docs/benchmarks.md)
        pieces = split_at_pauses(state.audio, sample_rate=SAMPLE_RATE, min_silence_s=PAUSE_SECONDS)
        windows = pack_windows(pieces, sample_rate=SAMPLE_RATE, gap_seconds=PACK_GAP_SECONDS)
        state.timings["decode_audio"] += decode_audio_seconds
        state.timings["segment"] += time.perf_counter() - t0
        if not windows:
            return self._handler.finish_file(state)
        self._files[key] = state
        self._queue.extend(WindowTask(key, w) for w in windows)
        state.pending = len(windows)
        self.total_windows += len(windows)
        return None

    def step(self) -> tuple[list[tuple[Hashable, FileResult]], BatchReport | None]:
        """Decode one batch; return the files it finished (key, result) and what the batch held."""
        if not self._queue:
            return self._finish_all(), None
        self.total_windows -= share_encoder_passes(self._queue, self._files)
        tasks, rows = self._pick()
        keys = tuple(dict.fromkeys(t.file for t in tasks))
        report = BatchReport(len(rows) if rows else len(tasks), self.batch_size, keys)
        options = self._files[tasks[0].file].options
        try:
            if rows is None:
                results = self._handler.decode_windows(tasks, self._files, options)
            else:
                results = self._handler.decode_windows(tasks, self._files, options, rows)
        except Exception as exc:
            if not self._isolate:
                raise
            log.exception("a batch of %d windows failed; failing its %d file(s)", len(tasks), len(keys))
            return [(k, self._fail(k, exc)) for k in keys], report
        row_ids = {i: self._rows_planned + r for r, row in enumerate(rows or ()) for i in row}
        self._rows_planned += len(rows or ())
        for i, (task_, result) in enumerate(zip(tasks, results)):
            state = self._files[task_.file]
            if result is None:  # its shared row passed it over: in another row, or at last alone
                missed = (*task_.missed_rows, row_ids[i])
                self._queue.append(replace(task_, missed_rows=missed, alone=len(missed) >= ROW_MAX_TRIES))
                continue
            follow_ups = self._accept(task_, result, state)
            self._queue.extend(follow_ups)
            # a tail or a part decoded again is a new window; a retry is the same one, not yet done
            self.total_windows += sum(f.attempt == 0 for f in follow_ups)
            if not any(f.attempt > 0 for f in follow_ups):
                self.done_windows += 1
            state.pending += len(follow_ups) - 1
        done = [k for k, s in self._files.items() if s.pending == 0]  # in the order files came
        finished = [(k, self._handler.finish_file(self._files.pop(k))) for k in done]
        if not self._queue:
            finished += self._finish_all()
        return finished, report

    def _accept(self, task: WindowTask, decoded: Sequence[DecodingResult], state: FileState) -> list[WindowTask]:
        """A task's attempts, accepted in order as if decoded one after another: while the handler
        sends the window back for its next attempt, the next one decoded answers it. Follow-ups
        are clamped to ``batch_size`` rows (a fan wider than a batch could never be picked)."""
        current = replace(task, fan=1)
        for j, result in enumerate(decoded):
            follow_ups = self._handler.accept_window(current, result, state)
            retry = (len(follow_ups) == 1 and follow_ups[0].window is task.window
                     and follow_ups[0].attempt == current.attempt + 1)
            if not retry or j == len(decoded) - 1:
                return [replace(f, fan=min(f.fan, self.batch_size)) for f in follow_ups]
            current = replace(follow_ups[0], fan=1)
        raise ValueError(f"no result for a task of {task.fan} attempt(s)")

    def _pick(self) -> tuple[list[WindowTask], list[tuple[int, ...]] | None]:
        """Take one batch of tasks off the queue, all with the same decoding options, and the
        rows they share (``None``: a row each)."""
        rows: list[tuple[int, ...]] | None = None
        if self._order == "longest":
            self._queue.sort(key=lambda t: t.samples, reverse=True)
            options = self._files[self._queue[0].file].options
            mine = [t for t in self._queue if self._files[t.file].options == options]
            if self._share_rows is not None and self._share_rows(options):
                planned = plan_rows([t.samples for t in mine], [t.attempt == 0 and not t.alone for t in mine],
                                    max_rows=self.batch_size, missed=[t.missed_rows for t in mine],
                                    widths=[t.fan for t in mine])
                taken = [mine[i] for row in planned for i in row]
                rows, pos = [], 0
                for row in planned:
                    rows.append(tuple(range(pos, pos + len(row))))
                    pos += len(row)
            else:
                taken, used = [], 0
                for t in mine:
                    if used + t.fan <= self.batch_size:
                        taken.append(t)
                        used += t.fan
        else:
            # Files in arrival order (dicts keep insertion order); each gives one window per round.
            oldest = next(k for k in self._files if any(t.file == k for t in self._queue))
            options = self._files[oldest].options
            per_file: dict[Hashable, list[WindowTask]] = {k: [] for k, s in self._files.items() if s.options == options}
            for t in sorted(self._queue, key=lambda t: t.samples, reverse=True):
                if t.file in per_file:
                    per_file[t.file].append(t)
            taken, used = [], 0
            while used < self.batch_size and any(per_file.values()):
                for waiting in per_file.values():
                    if waiting and used + waiting[0].fan <= self.batch_size:
                        used += waiting[0].fan
                        taken.append(waiting.pop(0))
                    elif waiting and used < self.batch_size:
                        waiting.clear()  # its next window is wider than the rows left: it waits for the next batch
        gone = {id(t) for t in taken}
        self._queue[:] = [t for t in self._queue if id(t) not in gone]
        return taken, rows

    def _fail(self, key: Hashable, exc: BaseException) -> FileResult:
        self._queue[:] = [t for t in self._queue if t.file != key]
        return FileResult(self._files.pop(key).name, None, exc)

    def _finish_all(self) -> list[tuple[Hashable, FileResult]]:
        return [(k, self._handler.finish_file(self._files.pop(k))) for k in list(self._files)]


def share_encoder_passes(queue: list[WindowTask], files: Mapping[Hashable, FileState]) -> int:
    """Join each file's queued short windows so that they share encoder passes; returns tasks saved.

    A window's undecoded tail (often 2-8 s) and a file's short windows would each cost a full
    30 s encoder pass; joined (:func:`~batch_job.segment.join_windows`, first-fit decreasing, at most 30 s), they
    cost one. Only first attempts are joined: a temperature retry re-decodes its window as it was.
    (On 681 s of joined clips: 7 tails of 36 s in all took 7 passes, see docs/benchmarks.md.)
    """
    by_file: dict[Hashable, list[WindowTask]] = defaultdict(list)
    for t in queue:
        if t.attempt == 0 and not t.alone:
            by_file[t.file].append(t)
    joined: list[WindowTask] = []
    gone: set[int] = set()
    for file, tasks in by_file.items():
        if len(tasks) < 2:
            continue
        groups = group_to_fill([t.window for t in tasks], max_samples=WINDOW_SECONDS * SAMPLE_RATE)
        for group in (g for g in groups if len(g) > 1):
            parts = [tasks[i] for i in group]
            gone.update(id(t) for t in parts)
            window = join_windows([t.window for t in parts])
            # The freshest part's budget: a part never decoded must not inherit a long tail chain's
            # spent continuations (its audio would be dropped at the cap). Still bounded: each
            # fresh window can renew the budget once.
            joined.append(WindowTask(file, window, continuation=min(t.continuation for t in parts)))
        files[file].pending -= len(tasks) - len(groups)
    if not joined:
        return 0
    before = len(queue)
    queue[:] = [t for t in queue if id(t) not in gone] + joined
    return before - len(queue)
