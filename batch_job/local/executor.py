"""Local AWS Batch: ``submit_job(**kwargs)`` -> ``whisper-batch run-job`` processes on this machine.

:class:`LocalBatch` is the ``batch`` client handed to the submitter (``Clients(batch=...)``). It
honours the SubmitJob request the submitter builds (``jobName``, ``jobQueue``, ``jobDefinition``,
``parameters``; also ``arrayProperties``, ``containerOverrides.command/environment``,
``retryStrategy`` and ``timeout`` overrides; ``tags``/``propagateTags`` are accepted and kept)
and validates it like Batch does (a bad request raises a botocore ``ClientError``
``ClientException``), so the submitter's error path is the deployed one.

Job definitions (:func:`default_job_definitions`) mirror cloudformation/template.yaml: the command
``["run-job", "--input", "Ref::input", "--output", "Ref::output"]`` run by the image's entrypoint
(here ``python -m batch_job.cli``; parameters are substituted per argument, never through a
shell), ``Attempts: 3`` and ``EvaluateOnExit`` built from :data:`batch_job.exit_codes.RETRYABLE`
(RETRY) with everything else EXIT (first match wins), and the attempt timeouts.

Queue: a SQLite journal in ``DATA_DIR/.whisper-batch-local/jobs.sqlite``. Queued jobs survive a
restart; a job running when local mode stops is sent SIGTERM (the worker exits 75, writes an
``interrupted`` error marker) and goes back to the queue without using up an attempt (a stop is
not a job failure); a job found RUNNING at start (hard kill) is queued again the same way.
At most ``workers`` jobs run at once (default :func:`default_workers`); each gets
``cores / workers`` torch threads unless ``WHISPER_BATCH_THREADS`` is set.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from batch_job import exit_codes
from batch_job.local import die_with_parent, state_dir
from batch_job.settings import usable_cores

DEFAULT_QUEUE = "whisper-batch-local"
DEFAULT_JOB_DEFINITION = "whisper-batch-job"
DEFAULT_JOB_DEFINITION_LONG = "whisper-batch-job-long"
#: The image's entrypoint (``whisper-batch``), as this Python runs it.
ENTRYPOINT = (sys.executable, "-m", "batch_job.cli")
#: Seconds between SIGTERM and SIGKILL (ECS's default stop timeout).
STOP_TIMEOUT = 30.0

CORES_PER_JOB = 2
"""Cores each local job gets by default. On CPU one job on two threads beats two jobs on one each
for a burst of short files (one pack shares more encoder rows, docs/benchmarks.md "Many short
files end to end") and runs a lone long file on both cores; more threads per job are not measured."""

_JOB_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$")


def default_workers() -> int:
    """Jobs at once when ``--workers`` is not given: one per :data:`CORES_PER_JOB` usable cores, at least one."""
    return max(1, usable_cores() // CORES_PER_JOB)


def retry_strategy(attempts: int = 3) -> dict:
    """The job definition's RetryStrategy: RETRY on exit_codes.RETRYABLE, EXIT on anything else."""
    rules = [{"action": "RETRY", "onExitCode": str(code)} for code in sorted(exit_codes.RETRYABLE)]
    rules += [{"action": "EXIT", "onExitCode": str(code)} for code in sorted(exit_codes.PERMANENT)]
    rules.append({"action": "EXIT", "onReason": "*"})
    return {"attempts": attempts, "evaluateOnExit": rules}


@dataclass(frozen=True)
class JobDefinition:
    name: str
    command: tuple[str, ...] = ("run-job", "--input", "Ref::input", "--output", "Ref::output")
    parameters: Mapping[str, str] = field(default_factory=dict)
    environment: Mapping[str, str] = field(default_factory=dict)
    retry: Mapping[str, Any] = field(default_factory=retry_strategy)
    timeout_seconds: int | None = None


def default_job_definitions(output_uri: str, standard_timeout: int = 3600,
                            long_timeout: int = 6 * 3600) -> dict[str, JobDefinition]:
    params = {"input": "", "output": output_uri}
    return {
        DEFAULT_JOB_DEFINITION: JobDefinition(DEFAULT_JOB_DEFINITION, parameters=params, timeout_seconds=standard_timeout),
        DEFAULT_JOB_DEFINITION_LONG: JobDefinition(DEFAULT_JOB_DEFINITION_LONG, parameters=params,
                                                   timeout_seconds=long_timeout),
    }


def evaluate_on_exit(strategy: Mapping[str, Any], exit_code: int | None, reason: str = "") -> str:
    """``RETRY`` or ``EXIT`` for one finished attempt: first matching rule wins (Batch's rule;
    ``onExitCode``/``onReason`` are globs). No rule matched: retry (Batch's default)."""
    for rule in strategy.get("evaluateOnExit") or []:
        checks = []
        if "onExitCode" in rule:
            checks.append(exit_code is not None and fnmatch.fnmatchcase(str(exit_code), str(rule["onExitCode"])))
        if "onReason" in rule:
            checks.append(fnmatch.fnmatchcase(reason or "", str(rule["onReason"])))
        if "onStatusReason" in rule:
            checks.append(fnmatch.fnmatchcase(reason or "", str(rule["onStatusReason"])))
        if checks and all(checks):
            return str(rule["action"]).upper()
    return "RETRY"


def _client_error(message: str):
    from botocore.exceptions import ClientError

    return ClientError({"Error": {"Code": "ClientException", "Message": message},
                        "ResponseMetadata": {"HTTPStatusCode": 400}}, "SubmitJob")


_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    name TEXT NOT NULL,
    queue TEXT NOT NULL,
    definition TEXT NOT NULL,
    request TEXT NOT NULL,
    array_parent TEXT,
    array_index INTEGER,
    status TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    exit_code INTEGER,
    status_reason TEXT,
    log TEXT,
    created REAL NOT NULL,
    started REAL,
    stopped REAL
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs(status, seq);
"""


class LocalBatch:
    """See the module docstring. ``on_event(kind, job)`` gets ``queued``, ``running``,
    ``succeeded``, ``retrying``, ``failed`` and ``requeued`` (``job`` = :meth:`describe` dict)."""

    def __init__(self, data_dir: str | Path, *, workers: int | None = None, queue: str = DEFAULT_QUEUE,
                 job_definitions: Mapping[str, JobDefinition] | None = None, env: Mapping[str, str] | None = None,
                 entrypoint: tuple[str, ...] = ENTRYPOINT, on_event: Callable[[str, dict], None] | None = None,
                 stop_timeout: float = STOP_TIMEOUT) -> None:
        self.state = state_dir(data_dir)
        self.log_dir = self.state / "logs" / "jobs"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.workers = max(1, int(workers or default_workers()))
        self.queue = queue
        self.job_definitions = dict(job_definitions or default_job_definitions(""))
        self.env = dict(os.environ if env is None else env)
        self.entrypoint = tuple(entrypoint)
        self.on_event = on_event
        self.stop_timeout = stop_timeout
        self._db = sqlite3.connect(str(self.state / "jobs.sqlite"), check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.executescript(_SCHEMA)
        self._lock = threading.RLock()
        self._wake = threading.Condition(self._lock)
        self._stopping = False
        self._threads: list[threading.Thread] = []
        self._running: dict[str, subprocess.Popen] = {}

    # ---------------------------------------------------------------- the Batch API subset
    def submit_job(self, **kwargs: Any) -> dict:
        """AWS Batch ``SubmitJob``: validates, journals the job (RUNNABLE) and returns at once."""
        name = kwargs.get("jobName")
        queue = kwargs.get("jobQueue")
        definition_ref = kwargs.get("jobDefinition")
        if not isinstance(name, str) or not _JOB_NAME.match(name):
            raise _client_error(f"jobName {name!r} must be 1-128 characters [A-Za-z0-9_-] starting with a letter or digit")
        if queue not in (self.queue, f"arn:aws:batch:local:000000000000:job-queue/{self.queue}"):
            raise _client_error(f"jobQueue {queue!r} does not exist (local queue: {self.queue!r})")
        definition = self._definition(definition_ref)
        params = kwargs.get("parameters") or {}
        if not isinstance(params, Mapping) or not all(isinstance(v, str) for v in params.values()):
            raise _client_error("parameters must map names to strings")
        size = int((kwargs.get("arrayProperties") or {}).get("size") or 0)
        if kwargs.get("arrayProperties") is not None and not 2 <= size <= 10_000:
            raise _client_error("arrayProperties.size must be between 2 and 10000")
        request = json.loads(json.dumps(kwargs, default=str))
        request["jobDefinition"] = definition.name
        job_id = str(uuid.uuid4())
        now = time.time()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                if size:
                    self._insert(job_id, name, queue, definition.name, request, "PENDING", now)
                    for i in range(size):
                        self._insert(f"{job_id}:{i}", name, queue, definition.name, request, "RUNNABLE", now,
                                     parent=job_id, index=i)
                else:
                    self._insert(job_id, name, queue, definition.name, request, "RUNNABLE", now)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._wake.notify_all()
        for child in ([f"{job_id}:{i}" for i in range(size)] if size else [job_id]):
            self._emit("queued", child)
        arn = f"arn:aws:batch:local:000000000000:job/{job_id}"
        return {"jobArn": arn, "jobName": name, "jobId": job_id}

    def describe_jobs(self, jobs: list[str]) -> dict:
        return {"jobs": [d for d in (self.describe(j) for j in jobs) if d is not None]}

    def list_jobs(self, status: str | None = None) -> list[dict]:
        with self._lock:
            rows = self._db.execute(
                "SELECT id FROM jobs WHERE status != 'PENDING'" + (" AND status = ?" if status else "") + " ORDER BY seq",
                (status,) if status else ()).fetchall()
        return [d for d in (self.describe(r["id"]) for r in rows) if d is not None]

    def describe(self, job_id: str) -> dict | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            return None
        request = json.loads(row["request"])
        params = self._parameters(row)
        return {
            "jobId": row["id"], "jobName": row["name"], "jobQueue": row["queue"],
            "jobDefinition": row["definition"], "status": row["status"], "attempts": row["attempts"],
            "statusReason": row["status_reason"], "exitCode": row["exit_code"], "parameters": params,
            "arrayIndex": row["array_index"], "tags": request.get("tags") or {}, "log": row["log"],
            "createdAt": row["created"], "startedAt": row["started"], "stoppedAt": row["stopped"],
        }

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> int:
        """Start the workers; returns how many jobs were already queued (from an earlier run)."""
        with self._lock:
            self._db.execute("UPDATE jobs SET status = 'RUNNABLE', attempts = MAX(attempts - 1, 0), "
                             "status_reason = 'requeued: local mode was killed while it ran' WHERE status = 'RUNNING'")
            queued = self._db.execute("SELECT COUNT(*) FROM jobs WHERE status = 'RUNNABLE'").fetchone()[0]
            self._stopping = False
        for i in range(self.workers):
            thread = threading.Thread(target=self._worker, name=f"local-batch-{i}", daemon=True)
            thread.start()
            self._threads.append(thread)
        return int(queued)

    def stop(self, timeout: float | None = None) -> int:
        """Stop taking jobs, SIGTERM the running ones (they go back to the queue), wait for the
        workers. Returns how many jobs stay queued for the next start."""
        with self._lock:
            self._stopping = True
            running = list(self._running.values())
            self._wake.notify_all()
        for proc in running:
            _signal(proc, signal.SIGTERM)
        deadline = time.monotonic() + (self.stop_timeout if timeout is None else timeout)
        for thread in self._threads:
            thread.join(max(0.1, deadline - time.monotonic()))
        with self._lock:
            for proc in self._running.values():  # did not exit within the stop timeout
                _signal(proc, signal.SIGKILL)
        for thread in self._threads:
            thread.join(5)
        self._threads = []
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM jobs WHERE status IN ('RUNNABLE', 'RUNNING')").fetchone()[0])

    def counts(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute("SELECT status, COUNT(*) AS n FROM jobs WHERE status != 'PENDING' GROUP BY status")
            return {r["status"]: int(r["n"]) for r in rows}

    def idle(self) -> bool:
        counts = self.counts()
        return not counts.get("RUNNABLE") and not counts.get("RUNNING")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # ---------------------------------------------------------------- internals
    def _definition(self, ref: Any) -> JobDefinition:
        if not isinstance(ref, str) or not ref:
            raise _client_error("jobDefinition is required")
        name = ref.rsplit("/", 1)[-1].split(":", 1)[0]  # ARN, name:revision or name
        if name not in self.job_definitions:
            raise _client_error(f"jobDefinition {ref!r} does not exist (local: {sorted(self.job_definitions)})")
        return self.job_definitions[name]

    def _insert(self, job_id: str, name: str, queue: str, definition: str, request: dict, status: str,
                now: float, parent: str | None = None, index: int | None = None) -> None:
        self._db.execute("INSERT INTO jobs (id, name, queue, definition, request, array_parent, array_index, status, "
                         "created) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                         (job_id, name, queue, definition, json.dumps(request), parent, index, status, now))

    def _parameters(self, row: Mapping[str, Any]) -> dict[str, str]:
        definition = self.job_definitions.get(row["definition"])
        request = json.loads(row["request"])
        return {**(dict(definition.parameters) if definition else {}), **(request.get("parameters") or {})}

    def _emit(self, kind: str, job_id: str) -> None:
        if self.on_event is None:
            return
        job = self.describe(job_id)
        if job is not None:
            try:
                self.on_event(kind, job)
            except Exception:  # noqa: BLE001 - a progress printer must not break the queue
                pass

    def _claim(self) -> sqlite3.Row | None:
        with self._lock:
            while not self._stopping:
                row = self._db.execute("SELECT * FROM jobs WHERE status = 'RUNNABLE' ORDER BY seq LIMIT 1").fetchone()
                if row is not None:
                    attempt = int(row["attempts"]) + 1
                    log = str(self.log_dir / f"{row['name']}-{row['id'].replace(':', '-')}.log")
                    self._db.execute("UPDATE jobs SET status = 'RUNNING', attempts = ?, started = ?, log = ?, "
                                     "status_reason = NULL WHERE id = ?", (attempt, time.time(), log, row["id"]))
                    return self._db.execute("SELECT * FROM jobs WHERE id = ?", (row["id"],)).fetchone()
                self._wake.wait(1.0)
        return None

    def _worker(self) -> None:
        while True:
            row = self._claim()
            if row is None:
                return
            try:
                self._run(row)
            except Exception as exc:  # noqa: BLE001 - keep the worker alive; the job fails visibly
                self._finish(row["id"], "FAILED", None, f"local executor error: {exc!r}")

    def _command(self, row: sqlite3.Row) -> tuple[list[str], dict[str, str], JobDefinition, dict]:
        definition = self.job_definitions[row["definition"]]
        request = json.loads(row["request"])
        params = self._parameters(row)
        overrides = request.get("containerOverrides") or {}
        command = list(overrides.get("command") or definition.command)
        argv = [*self.entrypoint, *(_substitute(arg, params) for arg in command)]
        env = dict(self.env)
        env.update(definition.environment)
        for item in overrides.get("environment") or []:
            env[str(item["name"])] = str(item.get("value", ""))
        env.setdefault("WHISPER_BATCH_THREADS", str(max(1, usable_cores() // self.workers)))
        env.update({
            "AWS_BATCH_JOB_ID": row["id"], "AWS_BATCH_JOB_ATTEMPT": str(row["attempts"]),
            "AWS_BATCH_JQ_NAME": row["queue"], "AWS_BATCH_CE_NAME": "local",
        })
        if row["array_index"] is not None:
            env["AWS_BATCH_JOB_ARRAY_INDEX"] = str(row["array_index"])
        strategy = request.get("retryStrategy") or definition.retry
        if "evaluateOnExit" not in strategy:
            strategy = {**definition.retry, **strategy}
        timeout = (request.get("timeout") or {}).get("attemptDurationSeconds") or definition.timeout_seconds
        return argv, env, definition, {"strategy": strategy, "timeout": timeout}

    def _run(self, row: sqlite3.Row) -> None:
        job_id = row["id"]
        argv, env, _definition, policy = self._command(row)
        self._emit("running", job_id)
        timed_out = False
        with open(row["log"], "ab") as log:
            log.write(f"==== attempt {row['attempts']} {time.strftime('%Y-%m-%dT%H:%M:%S')} "
                      f"{json.dumps(argv[len(self.entrypoint):])}\n".encode())
            log.flush()
            with self._lock:
                if self._stopping:  # stopped between claim and start: back to the queue
                    self._requeue(job_id)
                    return
                proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True, close_fds=True, preexec_fn=die_with_parent)
                self._running[job_id] = proc
            try:
                try:
                    proc.wait(timeout=policy["timeout"])
                except subprocess.TimeoutExpired:
                    timed_out = True
                    _signal(proc, signal.SIGTERM)
                    try:
                        proc.wait(timeout=self.stop_timeout)
                    except subprocess.TimeoutExpired:
                        _signal(proc, signal.SIGKILL)
                        proc.wait()
            finally:
                with self._lock:
                    self._running.pop(job_id, None)
        code = proc.returncode
        if code is not None and code < 0:
            code = 128 - code  # killed by a signal: the container's 128+N
        if timed_out:  # Batch does not retry an attempt that hit its timeout
            self._finish(job_id, "FAILED", code, f"Job attempt duration exceeded timeout ({policy['timeout']} s)")
            return
        if code == exit_codes.OK:
            self._finish(job_id, "SUCCEEDED", code, "Essential container in task exited")
            return
        with self._lock:
            stopping = self._stopping
        if stopping and code not in exit_codes.PERMANENT:  # interrupted by our own stop
            self._requeue(job_id, code)
            return
        action = evaluate_on_exit(policy["strategy"], code, "Essential container in task exited")
        attempts = int(row["attempts"])
        if action == "RETRY" and attempts < int(policy["strategy"].get("attempts") or 1):
            with self._lock:
                self._db.execute("UPDATE jobs SET status = 'RUNNABLE', exit_code = ?, status_reason = ? WHERE id = ?",
                                 (code, f"attempt {attempts} exited {code}; retrying", job_id))
                self._wake.notify_all()
            self._emit("retrying", job_id)
            return
        self._finish(job_id, "FAILED", code, f"Essential container in task exited (exit code {code})")

    def _requeue(self, job_id: str, code: int | None = None) -> None:
        with self._lock:
            self._db.execute("UPDATE jobs SET status = 'RUNNABLE', attempts = MAX(attempts - 1, 0), exit_code = ?, "
                             "status_reason = 'interrupted by local mode stop; queued for the next start' WHERE id = ?",
                             (code, job_id))
        self._emit("requeued", job_id)

    def _finish(self, job_id: str, status: str, code: int | None, reason: str) -> None:
        with self._lock:
            self._db.execute("UPDATE jobs SET status = ?, exit_code = ?, status_reason = ?, stopped = ? WHERE id = ?",
                             (status, code, reason, time.time(), job_id))
        self._emit("succeeded" if status == "SUCCEEDED" else "failed", job_id)


def _substitute(arg: str, params: Mapping[str, str]) -> str:
    """Batch's ``Ref::name`` substitution: a whole-argument reference is replaced by the value."""
    if arg.startswith("Ref::") and arg[5:] in params:
        return params[arg[5:]]
    return arg


def _signal(proc: subprocess.Popen, sig: int) -> None:
    try:
        if proc.poll() is None:
            proc.send_signal(sig)
    except ProcessLookupError:  # pragma: no cover - exited meanwhile
        pass
