"""SIGTERM/SIGINT become :class:`InterruptedJobError` in the main thread, where the job is."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from batch_job.errors import InterruptedJobError


class Interrupts:
    """Raises :class:`InterruptedJobError` at the first signal while ``armed``; remembers it otherwise.

    A signal that arrives while disarmed (a completion marker being written) is raised by the
    next :meth:`check` after re-arming, so a commit is never cut in half.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self.armed = True

    def error(self) -> InterruptedJobError:
        name = signal.Signals(self.signum).name if self.signum else "signal"
        return InterruptedJobError(f"received {name}; stopped before completion, retry will redo the job")

    def handler(self, signum: int, frame: Any) -> None:
        first = self.signum is None
        if first:
            self.signum = signum
        if first and self.armed:
            raise self.error()

    def check(self) -> None:
        """Raise if a signal arrived but was deferred or swallowed somewhere (e.g. by a library)."""
        if self.signum is not None and self.armed:
            raise self.error()

    @contextmanager
    def deferred(self) -> Iterator[None]:
        """No interruption inside the block; a signal that arrived meanwhile is raised after it."""
        was, self.armed = self.armed, False
        try:
            yield
        finally:
            self.armed = was
        self.check()


@contextmanager
def signal_handlers(interrupts: Interrupts, install: bool) -> Iterator[None]:
    """Route SIGTERM/SIGINT to ``interrupts`` (main thread only) and restore the old handlers."""
    if not install or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, interrupts.handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
