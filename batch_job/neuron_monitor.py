"""Sample ``neuron-monitor`` during a job: utilization of the NeuronCore this job uses.

``neuron-monitor`` (aws-neuron-tools) prints one JSON report per period on stdout. The part we
read is documented as::

    {"neuron_runtime_data": [
        {"pid": 4242, "neuron_runtime_tag": "...", "error": "",
         "report": {"neuroncore_counters": {"period": 1.0, "error": "",
                    "neuroncores_in_use": {"0": {"neuroncore_utilization": 42.0, ...}, ...}},
                    ...other metric groups...}},
        ...other runtimes on the host...],
     "system_data": {...}, "instance_info": {...}, "neuron_hardware_info": {...}}

Which core is "ours": the cores in ``NEURON_RT_VISIBLE_CORES`` (``"2"``, ``"0-1"``, ``"0,3"``)
when set, else the lowest-numbered core of the runtime whose ``pid`` is this process (or of the
only/first runtime when reports carry no ``pid``). With several of our cores the sample is
their mean.

The sampler runs only when the executable is on PATH; it never raises into the job.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any


def parse_visible_cores(value: str | None) -> frozenset[int] | None:
    """``NEURON_RT_VISIBLE_CORES`` -> core indices (``"1"``, ``"0-3"``, ``"0,2-3"``); None if unset/invalid."""
    if not value or not value.strip():
        return None
    cores: set[int] = set()
    try:
        for part in value.split(","):
            part = part.strip()
            if not part:
                continue
            lo, dash, hi = part.partition("-")
            if dash:
                cores.update(range(int(lo), int(hi) + 1))
            else:
                cores.add(int(lo))
    except ValueError:
        return None
    return frozenset(cores) or None


def _cores_in_use(runtime: Mapping[str, Any]) -> dict[int, float]:
    report = runtime.get("report") or {}
    counters = report.get("neuroncore_counters") or {}
    in_use = counters.get("neuroncores_in_use") or {}
    out: dict[int, float] = {}
    if not isinstance(in_use, Mapping):
        return out
    for idx, data in in_use.items():
        try:
            value = (data or {}).get("neuroncore_utilization")
            if value is not None:
                out[int(idx)] = float(value)
        except (TypeError, ValueError, AttributeError):
            continue
    return out


def core_utilization(report: Mapping[str, Any], *, pid: int | None = None,
                     visible_cores: Iterable[int] | None = None) -> float | None:
    """Utilization (percent) of this job's core(s) in one report, or ``None`` if not in it."""
    runtimes = [r for r in (report.get("neuron_runtime_data") or []) if isinstance(r, Mapping)]
    if not runtimes:
        return None
    with_pid = [r for r in runtimes if r.get("pid") is not None]
    ours = [r for r in with_pid if pid is not None and _same_pid(r.get("pid"), pid)]
    cores = frozenset(visible_cores) if visible_cores is not None else None
    if cores:
        # Our cores by index; prefer our runtime's numbers, else whichever runtime reports them.
        for candidates in (ours, runtimes):
            values = [v for r in candidates for c, v in _cores_in_use(r).items() if c in cores]
            if values:
                return sum(values) / len(values)
        return None
    if ours:
        runtime = ours[0]
    elif with_pid:
        return None  # reports name their processes and none is us: not our core
    else:
        runtime = runtimes[0]
    in_use = _cores_in_use(runtime)
    if not in_use:
        return None
    return in_use[min(in_use)]


def _same_pid(value: Any, pid: int) -> bool:
    try:
        return int(value) == pid
    except (TypeError, ValueError):
        return False


@dataclass(frozen=True)
class Utilization:
    avg: float
    peak: float
    samples: int

    def as_figures(self) -> dict[str, Any]:
        return {"neuroncore_utilization_avg": round(self.avg, 2),
                "neuroncore_utilization_peak": round(self.peak, 2),
                "neuroncore_utilization_samples": self.samples}


def monitor_config(period_seconds: float) -> dict[str, Any]:
    """neuron-monitor config: only the NeuronCore counters, at our period."""
    period = f"{max(0.1, float(period_seconds)):g}s"
    return {"period": period,
            "neuron_runtimes": [{"tag_filter": ".*", "metrics": [{"type": "neuroncore_counters"}]}],
            "system_metrics": []}


class NeuronMonitorSampler:
    """Runs ``neuron-monitor`` in a subprocess, parses its reports in a background thread.

    Use as a context manager, or ``start()``/``stop()``; ``result()`` gives the
    :class:`Utilization` (``None`` when the tool is absent or reported nothing for our core).
    """

    def __init__(self, executable: str = "neuron-monitor", *, period_seconds: float = 1.0,
                 pid: int | None = None, visible_cores: Iterable[int] | None = None,
                 environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self.executable = executable
        self.period_seconds = period_seconds
        self.pid = os.getpid() if pid is None else pid
        self.visible_cores = (frozenset(visible_cores) if visible_cores is not None
                              else parse_visible_cores(env.get("NEURON_RT_VISIBLE_CORES")))
        self._path = shutil.which(executable, path=env.get("PATH"))
        self._proc: subprocess.Popen[str] | None = None
        self._thread: threading.Thread | None = None
        self._config_dir: tempfile.TemporaryDirectory[str] | None = None
        self._lock = threading.Lock()
        self._samples: list[float] = []
        self.error: str | None = None

    @property
    def available(self) -> bool:
        return self._path is not None

    def start(self) -> NeuronMonitorSampler:
        if not self._path or self._proc is not None:
            return self
        try:
            self._config_dir = tempfile.TemporaryDirectory(prefix="neuron-monitor-")
            config = os.path.join(self._config_dir.name, "monitor.json")
            with open(config, "w", encoding="utf-8") as f:
                json.dump(monitor_config(self.period_seconds), f)
            self._proc = subprocess.Popen(
                [self._path, "-c", config], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL, text=True, encoding="utf-8", errors="replace",
                start_new_session=True)  # a Ctrl-C to the job's process group is ours to handle
        except OSError as exc:
            self.error = f"cannot start {self._path}: {exc}"
            self._cleanup_config()
            return self
        self._thread = threading.Thread(target=self._read, name="neuron-monitor", daemon=True)
        self._thread.start()
        return self

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            line = line.strip()
            if not line:
                continue
            try:
                report = json.loads(line)
            except ValueError:
                continue
            if not isinstance(report, Mapping):
                continue
            value = core_utilization(report, pid=self.pid, visible_cores=self.visible_cores)
            if value is not None:
                with self._lock:
                    self._samples.append(value)

    def stop(self, timeout: float = 2.0) -> Utilization | None:
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=timeout)
            if self._thread is not None:
                self._thread.join(timeout=timeout)
            if proc.stdout is not None:
                proc.stdout.close()
        self._cleanup_config()
        return self.result()

    def _cleanup_config(self) -> None:
        if self._config_dir is not None:
            self._config_dir.cleanup()
            self._config_dir = None

    def result(self) -> Utilization | None:
        with self._lock:
            samples = list(self._samples)
        if not samples:
            return None
        return Utilization(avg=sum(samples) / len(samples), peak=max(samples), samples=len(samples))

    def __enter__(self) -> NeuronMonitorSampler:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
