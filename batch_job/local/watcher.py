"""S3 -> SQS -> Lambda, locally: list the input prefix, deliver new objects to the real handler.

Every ``interval`` seconds the watcher lists ``s3://BUCKET/INPUT_PREFIX`` through the S3 endpoint
(so an object uploaded with any S3 client and a file copied straight into
``DATA_DIR/BUCKET/INPUT_PREFIX`` both count), and hands each new object version to
``submitter.app.handler`` in the shape the stack delivers: an SQS event (at most
:data:`SQS_BATCH_SIZE` records, the stack's default ``SubmitterBatchSize``) whose message bodies
are S3 ``ObjectCreated:Put`` notifications with URL-encoded keys (``quote_plus``, ``/`` kept).

"New" = a ``(key, ETag, LastModified)`` not delivered before: a re-upload, even of identical
bytes, is delivered again (S3 notifies every PUT; the handler's idempotency turns it into no
second job). Delivered objects are remembered in ``DATA_DIR/.whisper-batch-local/watcher.json``
so a restart does not deliver them again. A message the handler reports in
``batchItemFailures`` (or all of them, if the invocation raised) is redelivered after a backoff
(1, 2, 4, ... s: the visibility timeout), up to ``max_receive_count`` receives (the queue's
redrive policy), then reported as dead-lettered.

Objects are delivered once their LastModified is ``settle`` seconds old, so a file still being
copied into the folder is not picked up half-written. An object whose upload the caller saw
complete (:meth:`Watcher.uploaded`: local mode's own PUTs, which S3 makes visible only whole) is
settled at once, and :meth:`Watcher.poll_soon` delivers the burst without waiting for the next
round. Like the stack's batching window
(``SubmitterBatchingWindow``), settled objects wait while more are still arriving (younger than
``settle``), up to ``batch_window`` seconds or until a batch is full, so a burst of uploads
reaches the submitter as one event and is packed as one (the stack waits up to 20 s; local
mode, interactive, at most a few).
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import quote_plus

from batch_job.fsutil import atomic_write_text
from batch_job.local import REGION
from batch_job.s3io import normalize_etag

#: Messages per invocation: the stack's default SubmitterBatchSize (tests/test_template.py checks).
SQS_BATCH_SIZE = 100
#: Seconds settled objects may wait for the rest of a burst still arriving (local default).
BATCH_WINDOW_SECONDS = 3.0
QUEUE_ARN = f"arn:aws:sqs:{REGION}:000000000000:whisper-batch-uploads"


def encode_key(key: str) -> str:
    """How S3 writes a key into an event notification (form-encoded, ``/`` kept)."""
    return quote_plus(key, safe="/")


def s3_notification(bucket: str, obj: dict) -> dict:
    """One S3 ``ObjectCreated:Put`` notification for a listed object (documented shape)."""
    modified = obj["LastModified"]
    event_time = modified.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.") + f"{modified.microsecond // 1000:03d}Z"
    request_id = uuid.uuid4().hex[:16].upper()
    return {"Records": [{
        "eventVersion": "2.1",
        "eventSource": "aws:s3",
        "awsRegion": REGION,
        "eventTime": event_time,
        "eventName": "ObjectCreated:Put",
        "userIdentity": {"principalId": "local"},
        "requestParameters": {"sourceIPAddress": "127.0.0.1"},
        "responseElements": {"x-amz-request-id": request_id, "x-amz-id-2": "local"},
        "s3": {
            "s3SchemaVersion": "1.0",
            "configurationId": "whisper-batch-uploads",
            "bucket": {"name": bucket, "ownerIdentity": {"principalId": "local"}, "arn": f"arn:aws:s3:::{bucket}"},
            "object": {"key": encode_key(obj["Key"]), "size": int(obj["Size"]),
                       "eTag": normalize_etag(str(obj["ETag"])), "sequencer": f"{int(modified.timestamp() * 1e6):016X}"},
        },
    }]}


def sqs_event(bodies: list[dict], receive_counts: list[int] | None = None) -> dict:
    """An SQS -> Lambda event carrying ``bodies`` (JSON-encoded) as messages."""
    now_ms = str(int(time.time() * 1000))
    records = []
    for i, body in enumerate(bodies):
        records.append({
            "messageId": str(uuid.uuid4()),
            "receiptHandle": uuid.uuid4().hex,
            "body": json.dumps(body),
            "attributes": {"ApproximateReceiveCount": str((receive_counts or [1] * len(bodies))[i]),
                           "SentTimestamp": now_ms, "SenderId": "local", "ApproximateFirstReceiveTimestamp": now_ms},
            "messageAttributes": {},
            "md5OfBody": "",
            "eventSource": "aws:sqs",
            "eventSourceARN": QUEUE_ARN,
            "awsRegion": REGION,
        })
    return {"Records": records}


def _version(obj: dict) -> tuple[str, str]:
    """A listed object's (key, ETag without quotes)."""
    return obj["Key"], normalize_etag(str(obj["ETag"]))


def _identity(obj: dict) -> str:
    return json.dumps([*_version(obj), obj["LastModified"].isoformat()])


class Watcher:
    """Polls the input prefix and feeds new objects to ``deliver(sqs_event) -> handler response``.

    ``on_delivered(key, obj)`` is called for each object the handler accepted and
    ``on_dead_letter(key, error)`` for one it kept failing.
    """

    def __init__(self, s3: Any, bucket: str, prefix: str, state_path: str | Path,
                 deliver: Callable[[dict], Any], *, interval: float = 1.0, settle: float = 1.0,
                 batch_window: float = BATCH_WINDOW_SECONDS, max_receive_count: int = 5, retry_delay: float = 1.0, on_delivered: Callable[[str, dict], None] | None = None,
                 on_dead_letter: Callable[[str, str], None] | None = None,
                 on_error: Callable[[str], None] | None = None) -> None:
        self.s3 = s3
        self.bucket = bucket
        self.prefix = prefix
        self.state_path = Path(state_path)
        self.deliver = deliver
        self.interval = interval
        self.settle = settle
        self.batch_window = batch_window
        self._waiting_since: float | None = None  # when settled objects started waiting for a burst
        self.max_receive_count = max_receive_count
        self.retry_delay = retry_delay
        self.on_delivered = on_delivered
        self.on_dead_letter = on_dead_letter
        self.on_error = on_error
        self.seen: set[str] = set()
        #: identity -> (receive count, not before) of messages the handler failed (visibility timeout)
        self.receives: dict[str, tuple[int, float]] = {}
        #: (key, ETag) of objects whose PUT the caller saw complete: settled without waiting
        self.complete: set[tuple[str, str]] = set()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._poll_lock = threading.Lock()
        self._last_error: str | None = None
        self._load()

    # ---------------------------------------------------------------- persistence
    def _load(self) -> None:
        try:
            data = json.loads(self.state_path.read_text(encoding="utf-8"))
            self.seen = set(data.get("delivered") or [])
        except FileNotFoundError:
            self.seen = set()
        except (OSError, ValueError):  # unreadable memory: the handler's idempotency still protects
            self.seen = set()

    def _save(self) -> None:
        atomic_write_text(self.state_path, json.dumps({"delivered": sorted(self.seen)}, ensure_ascii=False))

    # ---------------------------------------------------------------- polling
    def list_new(self) -> list[dict]:
        """Objects under the prefix not delivered yet and settled (oldest first)."""
        return self._list()[0]

    def _list(self) -> tuple[list[dict], int]:
        """(settled new objects, oldest first; how many new ones are still arriving)."""
        now = datetime.now(timezone.utc)
        new = []
        arriving = 0
        paginator = self.s3.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix):
            for obj in page.get("Contents") or []:
                if obj["Key"].endswith("/") or _identity(obj) in self.seen:
                    continue
                if _version(obj) not in self.complete and (now - obj["LastModified"]).total_seconds() < self.settle:
                    arriving += 1
                    continue
                if self.receives.get(_identity(obj), (0, 0.0))[1] > time.monotonic():
                    continue  # failed delivery: invisible until its backoff passes
                new.append(obj)
        new.sort(key=lambda o: (o["LastModified"], o["Key"]))
        return new, arriving

    def poll(self) -> int:
        """One listing + delivery round; returns how many objects were delivered."""
        with self._poll_lock:
            try:
                objects, arriving = self._list()
                self._last_error = None
            except Exception as exc:  # noqa: BLE001 - endpoint hiccup: try again next round
                message = f"cannot list s3://{self.bucket}/{self.prefix}: {exc}"
                if message != self._last_error and self.on_error:
                    self.on_error(message)
                self._last_error = message
                return 0
            if not objects:
                self._waiting_since = None
                return 0
            now = time.monotonic()
            self._waiting_since = self._waiting_since or now
            if (arriving and len(objects) < SQS_BATCH_SIZE
                    and now - self._waiting_since < self.batch_window):
                return 0  # a burst is still arriving: let it fill the batch (the batching window)
            self._waiting_since = None
            delivered = 0
            for start in range(0, len(objects), SQS_BATCH_SIZE):
                if self._stop.is_set():
                    break
                delivered += self._deliver_batch(objects[start:start + SQS_BATCH_SIZE])
            return delivered

    def _deliver_batch(self, batch: list[dict]) -> int:
        ids = [_identity(o) for o in batch]
        counts = [self.receives.get(i, (0, 0.0))[0] + 1 for i in ids]
        event = sqs_event([s3_notification(self.bucket, o) for o in batch], counts)
        failed_ids: set[str] = set()
        error = ""
        try:
            response = self.deliver(event) or {}
            failures = {f.get("itemIdentifier") for f in response.get("batchItemFailures") or []}
            failed_ids = {ids[i] for i, r in enumerate(event["Records"]) if r["messageId"] in failures}
            error = "the handler reported the message as failed (see the submitter log)"
        except Exception as exc:  # noqa: BLE001 - the whole invocation failed: every message returns
            failed_ids = set(ids)
            error = f"{type(exc).__name__}: {exc}"
        delivered = 0
        for obj, ident, count in zip(batch, ids, counts, strict=True):
            if ident in failed_ids and count < self.max_receive_count:
                self.receives[ident] = (count, time.monotonic() + min(30.0, self.retry_delay * 2 ** (count - 1)))
                continue
            self.seen.add(ident)
            self.receives.pop(ident, None)
            self.complete.discard(_version(obj))
            if ident in failed_ids:
                if self.on_dead_letter:
                    self.on_dead_letter(obj["Key"], error)
            else:
                delivered += 1
                if self.on_delivered:
                    self.on_delivered(obj["Key"], obj)
        self._save()
        return delivered

    def uploaded(self, items: dict[str, str]) -> None:
        """``{key: ETag}`` of objects whose PUT has completed: no settling wait for those versions."""
        with self._poll_lock:
            self.complete.update((key, normalize_etag(etag)) for key, etag in items.items())

    def poll_soon(self) -> None:
        """Run the next round now instead of after ``interval`` (the watcher thread does it)."""
        self._wake.set()

    # ---------------------------------------------------------------- thread
    def start(self) -> Watcher:
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="local-watcher", daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.poll()
            self._wake.wait(self.interval)
            self._wake.clear()

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
