"""The request scheduler: every request in flight feeds one engine's fixed-shape batches.

One thread owns the engine. Requests (decoded audio and decoding options) arrive from the HTTP
handlers through :meth:`RequestScheduler.submit`, which admits at most ``max_queue`` at once and
refuses more (:class:`QueueFullError`: the server answers 503 with ``Retry-After``, never builds
an unbounded backlog). The thread moves admitted requests into a
:class:`~batch_job.stream.TranscriptionStream` between batches, so a request that arrives while
others decode joins the very next batch, and steps the stream one batch at a time. The stream
runs in ``fair`` order (round robin over requests in arrival order: a long file cannot starve a
short one) and isolates failures (a batch that raises fails only the requests it held).

When the engine is idle, the first request waits up to ``gather_seconds`` for others to share its
first batch (Triton's dynamic batcher's ``max_queue_delay``); once the engine is busy, nothing
waits on purpose: new requests join at the next batch boundary.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Hashable
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

from batch_job.constants import SAMPLE_RATE
from batch_job.engine.decoding import DecodingOptions
from batch_job.errors import WhisperBatchError
from batch_job.result import FileResult
from batch_job.stream import BatchReport, TranscriptionStream, WindowHandler

log = logging.getLogger(__name__)

RETRY_AFTER_SECONDS = 1
"""What a refused request is told to wait before trying again (``Retry-After``)."""


class QueueFullError(WhisperBatchError):
    """The server holds ``max_queue`` requests already. Transient: retry after ``retry_after`` s."""

    reason = "queue_full"
    retryable = True

    def __init__(self, message: str, *, retry_after: int = RETRY_AFTER_SECONDS) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class SchedulerClosedError(WhisperBatchError):
    """The server is shutting down and takes no new request. Transient: another instance may."""

    reason = "shutting_down"
    retryable = True


@dataclass(frozen=True)
class Outcome:
    """What the scheduler did for one request.

    ``result``: the transcript or the error. ``queue_seconds``: from admission to the first batch
    that held one of its windows; ``engine_seconds``: from then to its last. ``batches``: batches
    that held its windows; ``batch_fill``: their mean share of rows that held a window (any
    request's), the rest padding; ``shared_with``: most other requests in one of its batches.
    """

    result: FileResult
    queue_seconds: float
    engine_seconds: float
    batches: int
    batch_fill: float
    shared_with: int


@dataclass(frozen=True)
class SchedulerStats:
    """Counters since start: batches run, window rows they held, requests finished, admitted now."""

    batches: int
    rows: int
    batch_size: int
    finished: int
    in_flight: int

    @property
    def mean_fill(self) -> float:
        return self.rows / (self.batches * self.batch_size) if self.batches else 0.0


@dataclass
class _Request:
    key: Hashable
    audio: np.ndarray
    options: DecodingOptions
    future: Future[Outcome]
    decode_audio_seconds: float = 0.0
    admitted: float = field(default_factory=time.perf_counter)
    first_batch: float | None = None
    last_batch: float | None = None
    fills: list[float] = field(default_factory=list)
    shared_with: int = 0


class RequestScheduler:
    """Bounded admission in front of one engine thread; see the module docstring."""

    def __init__(self, handler: WindowHandler, *, max_queue: int = 64, gather_seconds: float = 0.01) -> None:
        if max_queue < 1:
            raise ValueError(f"max_queue must be at least 1, not {max_queue}")
        if gather_seconds < 0:
            raise ValueError(f"gather_seconds must not be negative, not {gather_seconds}")
        self.max_queue = max_queue
        self.gather_seconds = gather_seconds
        self._stream = TranscriptionStream(handler, order="fair", isolate_failures=True)
        self._cond = threading.Condition()
        self._inbox: deque[_Request] = deque()
        self._live: dict[Hashable, _Request] = {}  # admitted and not finished: inbox + stream
        self._closing = False
        self._batches = self._rows = self._finished = 0
        self._thread = threading.Thread(target=self._run, name="whisper-batch-scheduler", daemon=True)

    # ------------------------------------------------------------------ any thread
    def start(self) -> None:
        self._thread.start()

    def submit(self, key: Hashable, audio: np.ndarray, options: DecodingOptions, *,
               decode_audio_seconds: float = 0.0) -> Future[Outcome]:
        """Admit one request (``audio``: float32 ``[n]`` at 16 kHz); its future resolves when it is done.

        Raises :class:`QueueFullError` when ``max_queue`` requests are in flight already and
        :class:`SchedulerClosedError` once :meth:`close` was called.
        """
        request = _Request(key, audio, options, Future(), decode_audio_seconds)
        with self._cond:
            if self._closing:
                raise SchedulerClosedError("the server is shutting down; send the request again")
            if len(self._live) >= self.max_queue:
                raise QueueFullError(f"the server holds {self.max_queue} requests already "
                                     f"(WHISPER_BATCH_SERVE_MAX_QUEUE); retry in {RETRY_AFTER_SECONDS} s")
            if key in self._live:
                raise ValueError(f"request {key!r} is already in flight")
            self._live[key] = request
            self._inbox.append(request)
            self._cond.notify()
        return request.future

    def close(self, timeout: float | None = None) -> bool:
        """Take no new request, finish the admitted ones, stop the thread. True if it stopped in time."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)
        return not self._thread.is_alive()

    def stats(self) -> SchedulerStats:
        with self._cond:
            return SchedulerStats(self._batches, self._rows, self._stream.batch_size, self._finished, len(self._live))

    # ------------------------------------------------------------------ the engine thread
    def _run(self) -> None:
        while True:
            admitted = self._wait_for_work()
            if admitted is None:
                return
            for request in admitted:
                self._admit(request)
            if self._stream.queued:
                self._step()

    def _wait_for_work(self) -> list[_Request] | None:
        """Requests to move into the stream now (maybe none while it has work); None: stop."""
        with self._cond:
            while not self._inbox and not self._stream.queued:
                if self._closing:
                    return None
                self._cond.wait()
            if not self._stream.queued and self.gather_seconds > 0:
                deadline = time.perf_counter() + self.gather_seconds
                while len(self._inbox) < self._stream.batch_size and not self._closing:
                    left = deadline - time.perf_counter()
                    if left <= 0:
                        break
                    self._cond.wait(left)
            admitted = list(self._inbox)
            self._inbox.clear()
            return admitted

    def _admit(self, request: _Request) -> None:
        seconds = len(request.audio) / SAMPLE_RATE
        try:
            done = self._stream.add(request.key, str(request.key), request.audio, request.options,
                                    decode_audio_seconds=request.decode_audio_seconds)
        except Exception as exc:  # a request the stream cannot take fails alone
            log.exception("request %s (%.1f s of audio) could not be queued", request.key, seconds)
            done = FileResult(str(request.key), None, exc)
        request.audio = np.zeros(0, np.float32)  # the stream holds the samples now
        if done is not None:  # no speech at all: finished without a batch
            self._resolve(request.key, done)

    def _step(self) -> None:
        started = time.perf_counter()
        finished, report = self._stream.step()
        if report is not None:
            self._record(report, started, time.perf_counter())
        for key, result in finished:
            self._resolve(key, result)

    def _record(self, report: BatchReport, started: float, ended: float) -> None:
        with self._cond:
            self._batches += 1
            self._rows += report.rows
        for key in report.keys:
            request = self._live.get(key)
            if request is None:
                continue
            if request.first_batch is None:
                request.first_batch = started
            request.last_batch = ended
            request.fills.append(report.fill)
            request.shared_with = max(request.shared_with, len(report.keys) - 1)

    def _resolve(self, key: Hashable, result: FileResult) -> None:
        with self._cond:
            request = self._live.pop(key)
            self._finished += 1
        now = time.perf_counter()
        first = request.first_batch if request.first_batch is not None else now
        fills = request.fills
        outcome = Outcome(
            result=result,
            queue_seconds=max(0.0, first - request.admitted),
            engine_seconds=max(0.0, (request.last_batch or first) - first),
            batches=len(fills),
            batch_fill=sum(fills) / len(fills) if fills else 0.0,
            shared_with=request.shared_with,
        )
        request.future.set_result(outcome)
