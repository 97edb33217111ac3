"""Local mode's per-file progress: one line per FILE as it is queued, runs, finishes or fails.

A Batch job is a pack of files (issue #11), so job events alone cannot say which file is done.
This module joins three documented sources, never log text:

* the submitter's :class:`~submitter.jobs.Outcome` per object (``submitter.app.configure(on_outcome=...)``):
  ``queued`` (submitted, with its job), ``duplicate``, ``skipped``, submit failures;
* :class:`~batch_job.local.executor.LocalBatch` job events (``running``, ``succeeded``,
  ``retrying``, ``failed``, ``requeued``); a job's files come from its parameters: the object
  itself, or the lines of its pack manifest that belong to it (``batch_job.job`` reads the same
  manifest the same way);
* the completion markers: while a job runs, the markers of its files still pending are read every
  ``interval`` seconds, so each file is reported ``done`` as soon as the worker writes it; when the
  job ends, every file of it not reported yet is settled from its marker or its error marker.

:attr:`Progress.final` holds each file's last final state (``succeeded``/``failed``/``skipped``)
with the ETag it refers to; ``whisper-batch local --once`` waits on it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from batch_job.job import error_marker_key, is_manifest_uri, marker_key, output_key, read_pack
from batch_job.s3io import S3Uri, get_json, normalize_etag

#: Seconds between two reads of a running pack's pending markers.
MARKER_POLL_SECONDS = 1.0


@dataclass(frozen=True)
class FileState:
    """The final state of one input file: ``succeeded`` (``detail`` = its completion marker),
    ``failed`` (its error marker, or the job's description when there is none) or ``skipped``
    (``detail`` = ``{"reason": ...}``). ``etag`` is the object version it refers to."""

    status: str
    etag: str
    detail: Mapping[str, Any]


@dataclass
class _RunningJob:
    started: float
    keys: dict[str, str]  # input key -> the ETag the pack names (what the submitter saw)
    reported: set[str]


class Progress:
    """See the module docstring. ``say(what, key, detail)`` prints one progress line."""

    def __init__(self, s3: Any, bucket: str, output_prefix: str, say: Callable[[str, str, str], None],
                 *, interval: float = MARKER_POLL_SECONDS) -> None:
        self.s3 = s3
        self.bucket = bucket
        self.output_prefix = output_prefix
        self.say = say
        self.interval = interval
        self.final: dict[str, FileState] = {}
        self._lock = threading.Lock()
        self._running: dict[str, _RunningJob] = {}
        self._pack_cache: dict[tuple[str, int | None], dict[str, str]] = {}
        # A job may start before the submitter reports its outcomes (they follow SubmitJob):
        # its "running" lines wait for the file's "queued" line. job id -> {key: detail}.
        self._announced: set[tuple[str, str]] = set()  # (job id, key) reported queued
        self._early_running: dict[str, dict[str, str]] = {}
        self._since = time.time()  # jobs created before this (resumed after a restart) get no outcome
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---------------------------------------------------------------- sources
    def on_outcome(self, outcome: Any) -> None:
        """One :class:`submitter.jobs.Outcome` (the submitter's callback)."""
        obj = outcome.obj
        if obj.bucket != self.bucket:
            return
        if outcome.status == "submitted":
            pack = f", pack {outcome.manifest.rsplit('/', 1)[-1]}" if outcome.manifest else ""
            self.say("queued", obj.key, f"job {outcome.job_name} ({str(outcome.job_id)[:8]}{pack})")
            with self._lock:
                self._announced.add((str(outcome.job_id), obj.key))
                early = self._early_running.get(str(outcome.job_id), {}).pop(obj.key, None)
            if early is not None:
                self.say("running", obj.key, early)
        elif outcome.status == "duplicate":
            self.say("duplicate", obj.key, f"same bytes already submitted (job {outcome.job_name}); no new job")
        elif outcome.status == "skipped":
            self._settle(obj.key, FileState("skipped", normalize_etag(obj.etag), {"reason": outcome.reason}))
            self.say("skipped", obj.key, str(outcome.reason))
        elif outcome.status == "failed":
            self.say("submitter", obj.key, f"submit failed, will be redelivered: {outcome.error}")

    def on_dead_letter(self, key: str, etag: str, error: str) -> None:
        """The watcher gave up on a message (the queue's redrive to the DLQ)."""
        self._settle(key, FileState("skipped", etag, {"reason": f"dead-lettered: {error}"}))
        self.say("failed", key, f"submitter kept failing, message dead-lettered: {error}")

    def on_job_event(self, kind: str, job: dict) -> None:
        """A :class:`LocalBatch` event; ``job`` is its ``describe`` dict."""
        if kind == "queued":  # the submitter's outcome says it, per file
            return
        keys = self.keys_of(job)
        attempts = job.get("attempts") or 0
        if kind == "running":
            detail = f"attempt {attempts}/3" + (f", pack of {len(keys)}" if len(keys) > 1 else "")
            with self._lock:
                self._running[job["jobId"]] = _RunningJob(time.monotonic(), keys, set())
                resumed = float(job.get("createdAt") or self._since) < self._since
                now = [k for k in keys if resumed or attempts > 1 or (job["jobId"], k) in self._announced]
                self._early_running[job["jobId"]] = {k: detail for k in keys if k not in now}
            for key in now:
                self.say("running", key, detail)
            return
        with self._lock:
            running = self._running.pop(job["jobId"], None)
        reported = running.reported if running else set()
        took = time.monotonic() - running.started if running else None
        if kind == "requeued":
            for key in keys:
                if key not in reported:
                    self.say("requeued", key, "interrupted by the stop; runs at the next start")
            return
        for key, etag in keys.items():
            if key not in reported:
                self._settle_from_markers(key, etag, job, final=kind != "retrying", took=took)

    # ---------------------------------------------------------------- files of a job
    def keys_of(self, job: Mapping[str, Any]) -> dict[str, str]:
        """``{input key: ETag named by the submitter}`` of one job (the object, or its pack)."""
        uri = str((job.get("parameters") or {}).get("input") or "")
        index = job.get("arrayIndex")
        cache_key = (uri, index)
        if cache_key in self._pack_cache:
            return self._pack_cache[cache_key]
        try:
            src = S3Uri.parse(uri)
        except ValueError:
            return {}
        if is_manifest_uri(uri):
            try:
                entries = read_pack(self.s3, uri, index)
            except Exception:  # noqa: BLE001 - a broken manifest: the job itself reports it
                return {}
            keys = {S3Uri.parse(e.input_uri).key: normalize_etag(e.etag) for e in entries
                    if e.input_uri.startswith(f"s3://{self.bucket}/")}
        else:
            keys = {src.key: ""}
        self._pack_cache[cache_key] = keys
        return keys

    # ---------------------------------------------------------------- markers
    def _settle(self, key: str, state: FileState) -> None:
        with self._lock:
            self.final[key] = state

    def _marker(self, key: str, etag: str) -> dict | None:
        marker = get_json(self.s3, self.bucket, marker_key(self.output_prefix, key))
        if marker and (not etag or normalize_etag(str((marker.get("source") or {}).get("etag", ""))) == etag):
            return marker
        return None

    def _settle_from_markers(self, key: str, etag: str, job: Mapping[str, Any], *, final: bool,
                             took: float | None) -> None:
        try:
            marker = self._marker(key, etag)
            error = None if marker else get_json(self.s3, self.bucket, error_marker_key(self.output_prefix, key))
        except Exception as exc:  # noqa: BLE001 - the endpoint hiccuped: say so, settle as failed
            marker, error = None, {"reason": "local_error", "message": f"cannot read the markers: {exc}"}
        if marker is not None:
            self._done(key, marker, took)
            return
        error = error or {"reason": job.get("statusReason") or "unknown", "message": ""}
        detail = f"{error.get('reason')}" + (f": {error.get('message')}" if error.get("message") else "")
        detail += f"  (exit {job.get('exitCode')}" + (f", log {job.get('log')})" if job.get("log") else ")")
        if final:
            self._settle(key, FileState("failed", normalize_etag(str((error.get("source") or {}).get("etag") or etag)),
                                        error))
            self.say("failed", key, detail)
        else:
            self.say("retrying", key, f"attempt {job.get('attempts')} failed: {detail}")

    def _done(self, key: str, marker: Mapping[str, Any], took: float | None) -> None:
        etag = normalize_etag(str((marker.get("source") or {}).get("etag", "")))
        self._settle(key, FileState("succeeded", etag, marker))
        where = f"s3://{self.bucket}/{output_key(self.output_prefix, key, '.txt')}"
        self.say("done", key, f"-> {where}" + (f"  ({took:.1f} s)" if took is not None else ""))

    def poll(self) -> None:
        """One round: each running job's pending files whose completion marker has appeared."""
        with self._lock:
            pending = [(job_id, run, key, etag) for job_id, run in self._running.items()
                       for key, etag in run.keys.items() if key not in run.reported]
        for job_id, run, key, etag in pending:
            try:
                marker = self._marker(key, etag)
            except Exception:  # noqa: BLE001 - next round
                continue
            if marker is None:
                continue
            with self._lock:
                if self._running.get(job_id) is not run or key in run.reported:
                    continue
                run.reported.add(key)
            self._done(key, marker, time.monotonic() - run.started)

    # ---------------------------------------------------------------- thread
    def start(self) -> Progress:
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="local-progress", daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.poll()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None
