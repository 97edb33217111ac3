"""The job's log: one JSON object per line on stderr, stage times counted from process creation."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from datetime import datetime, timezone
from typing import IO, Any


def process_start_time() -> float:
    """Wall-clock time this process was created (so stage times include interpreter start-up).

    On Linux: now minus the process's age, both read against the same clock (``/proc/uptime``
    and the start tick in ``/proc/self/stat``), accurate to a clock tick (10 ms). Not
    ``psutil.Process().create_time()``: it adds the start tick to the boot time, which the
    kernel reports in whole seconds, so its figure was off by up to 1 s.
    """
    try:
        return time.time() - process_age_seconds()
    except (OSError, ValueError, IndexError):  # not Linux, or an unexpected /proc layout
        return time.time()


def process_age_seconds(pid: int | str = "self") -> float:
    """Seconds since process ``pid`` was created, from ``/proc`` (Linux)."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        stat = f.read()
    # Field 22 (starttime, clock ticks since boot); fields counted after the ")" closing comm.
    start_ticks = int(stat.rsplit(")", 1)[1].split()[19])
    with open("/proc/uptime", encoding="ascii") as f:
        uptime = float(f.read().split()[0])
    return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))


class JsonLog:
    """One JSON object per line on stderr: ``{"ts", "level", "stage", "elapsed_s", ...context, ...}``."""

    def __init__(self, stream: IO[str] | None = None, *, started_at: float | None = None, **context: Any) -> None:
        self.stream = stream
        self.started_at = process_start_time() if started_at is None else started_at
        self.context = {k: v for k, v in context.items() if v is not None}
        self._lock = threading.Lock()

    def __call__(self, stage: str, level: str = "info", **fields: Any) -> None:
        now = time.time()
        line = {"ts": datetime.fromtimestamp(now, tz=timezone.utc).isoformat(timespec="milliseconds"),
                "level": level, "stage": stage, "elapsed_s": round(now - self.started_at, 3)}
        line.update(self.context)
        line.update({k: v for k, v in fields.items() if v is not None})
        text = json.dumps(line, ensure_ascii=False, default=str)
        with self._lock:
            out = self.stream if self.stream is not None else sys.stderr
            try:
                out.write(text + "\n")
                out.flush()
            except (OSError, ValueError):  # closed stream: logging must not fail the job
                pass
