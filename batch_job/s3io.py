"""S3 plumbing for the Batch job: URIs, pinned streaming download, uploads and markers.

Everything here takes an explicit boto3 S3 client (see :func:`aws_client`), so the same code
runs against AWS, ``moto_server`` or any S3-compatible store (boto3 honours
``AWS_ENDPOINT_URL``). botocore errors are translated into the worker's error types:

* ``NoSuchKey`` / 404 on the input        -> :class:`~batch_job.errors.MissingInputError`
* object larger than the limit            -> :class:`~batch_job.errors.TooLargeError` (before any GET)
* anything else after all retries         -> :class:`~batch_job.errors.StorageError` (``s3_error``)

Keys are used verbatim: ``s3://b/a b/c+d é.wav`` names the key ``a b/c+d é.wav`` (no URL
decoding, ``+`` stays ``+``).
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from batch_job.errors import MissingInputError, StorageError, TooLargeError, WhisperBatchError

#: S3 error codes (and HTTP statuses) that mean "the object is not there".
_NOT_FOUND_CODES = frozenset({"NoSuchKey", "404", "NotFound", "NoSuchVersion"})
#: Codes that mean the pinned ETag/VersionId no longer matches (object overwritten mid-job).
_CHANGED_CODES = frozenset({"PreconditionFailed", "412"})


@dataclass(frozen=True)
class S3Uri:
    """``s3://bucket/key``; ``key`` may be a prefix (``""`` = bucket root)."""

    bucket: str
    key: str

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.key}"

    @classmethod
    def parse(cls, uri: str, *, prefix: bool = False) -> S3Uri:
        """Parse an S3 URI without URL-decoding the key.

        With ``prefix=True`` the key is an output prefix: it may be empty, and a non-empty one
        gets a trailing ``/`` when it has none (``s3://b/out`` -> ``out/``).
        Raises ``ValueError`` for anything that is not ``s3://BUCKET/...``.
        """
        if not isinstance(uri, str) or not uri.startswith("s3://"):
            raise ValueError(f"not an s3:// URI: {uri!r}")
        rest = uri[len("s3://"):]
        bucket, sep, key = rest.partition("/")
        if not bucket:
            raise ValueError(f"S3 URI has no bucket: {uri!r}")
        if prefix:
            if key and not key.endswith("/"):
                key += "/"
        elif not key or key.endswith("/"):
            raise ValueError(f"S3 URI names no object key: {uri!r}")
        return cls(bucket, key)


@dataclass(frozen=True)
class ObjectInfo:
    """What HEAD told us about the input; the download is pinned to ``etag``/``version_id``."""

    bucket: str
    key: str
    size: int
    etag: str
    version_id: str | None = None

    def source(self) -> dict[str, Any]:
        """The ``source`` block of the completion and error markers (ETag unquoted, as in S3 events)."""
        return {"bucket": self.bucket, "key": self.key, "etag": normalize_etag(self.etag),
                "version_id": self.version_id, "size": self.size}


def normalize_etag(etag: str | None) -> str:
    """ETag without the surrounding quotes HEAD/GET return (S3 events and the submitter use this form)."""
    return (etag or "").strip().strip('"')


def aws_client(service: str = "s3", max_attempts: int = 5, *, max_pool_connections: int | None = None,
               endpoint_url: str | None = None, signature_version: str | None = None):
    """A boto3 client with botocore's *standard* retry mode (5xx, throttling, timeouts).

    ``max_pool_connections``: for a client shared by that many threads (botocore's default is 10).
    ``signature_version``: e.g. ``"s3v4"`` for a client whose presigned URLs must be SigV4.
    """
    import boto3
    from botocore.config import Config

    extra: dict[str, Any] = {} if max_pool_connections is None else {"max_pool_connections": max_pool_connections}
    if signature_version:
        extra["signature_version"] = signature_version
    config = Config(retries={"mode": "standard", "max_attempts": max(1, int(max_attempts))}, **extra)
    return boto3.client(service, config=config, endpoint_url=endpoint_url or None)


def error_code(exc: BaseException) -> str:
    """The S3 error code of a botocore ``ClientError`` (``""`` for anything else)."""
    response = getattr(exc, "response", None) or {}
    err = response.get("Error") or {}
    code = str(err.get("Code") or "")
    if not code:
        status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
        code = str(status or "")
    return code


def _storage_error(action: str, uri: str, exc: BaseException) -> StorageError:
    code = error_code(exc)
    detail = f"{code}: {exc}" if code else f"{type(exc).__name__}: {exc}"
    return StorageError(f"S3 {action} {uri} failed: {detail}")


@contextmanager
def _read_errors(action: str, uri: str, missing: str) -> Iterator[None]:
    """Map a read's botocore errors: not found -> ``MissingInputError(missing)``, else ``StorageError``."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        yield
    except ClientError as exc:
        if error_code(exc) in _NOT_FOUND_CODES:
            raise MissingInputError(missing) from None
        raise _storage_error(action, uri, exc) from exc
    except BotoCoreError as exc:
        raise _storage_error(action, uri, exc) from exc


def head_object(client, bucket: str, key: str) -> ObjectInfo:
    """HEAD the input. ``MissingInputError`` if absent, ``StorageError`` on other failures."""
    uri = f"s3://{bucket}/{key}"
    with _read_errors("HEAD", uri, f"input object does not exist: {uri}"):
        resp = client.head_object(Bucket=bucket, Key=key)
    return ObjectInfo(bucket=bucket, key=key, size=int(resp.get("ContentLength", 0)),
                      etag=str(resp.get("ETag", "")), version_id=resp.get("VersionId") or None)


def check_size(info: ObjectInfo, max_bytes: int) -> None:
    """``TooLargeError`` when the object is over the download limit (checked before any GET)."""
    if max_bytes and info.size > max_bytes:
        raise TooLargeError(
            f"s3://{info.bucket}/{info.key} is {info.size} bytes, over the {max_bytes}-byte download limit")


def download(client, info: ObjectInfo, dest: str | Path, *, max_bytes: int, attempts: int = 3,
             backoff: float = 0.5, sleep: Callable[[float], None] = time.sleep) -> Path:
    """Stream the object to ``dest`` with boto3's transfer manager, pinned to HEAD's ETag/VersionId.

    Every GET carries ``IfMatch=<etag>`` (and ``VersionId`` when the bucket is versioned), so a
    concurrent overwrite gives ``PreconditionFailed`` instead of a file mixing two versions.
    botocore retries each request (standard mode); this function additionally retries the whole
    transfer up to ``attempts`` times with jittered backoff. Raises ``TooLargeError`` before any
    GET, ``MissingInputError`` if the object vanished, ``StorageError`` when retries are exhausted
    or the object changed underneath us.
    """
    from boto3.s3.transfer import TransferConfig, create_transfer_manager
    from botocore.exceptions import BotoCoreError, ClientError
    from s3transfer.subscribers import BaseSubscriber

    check_size(info, max_bytes)
    dest = Path(dest)
    uri = f"s3://{info.bucket}/{info.key}"
    extra_args = {"VersionId": info.version_id} if info.version_id else {}

    class _Pin(BaseSubscriber):
        """Hand HEAD's size and ETag to the transfer (no second HEAD; ranged GETs get IfMatch)."""

        def on_queued(self, future, **kwargs):
            future.meta.provide_transfer_size(info.size)
            future.meta.provide_object_etag(info.etag)

    def _if_match(params, **kwargs):
        # s3transfer adds IfMatch only to ranged GETs; pin the single-GET path too.
        if params.get("Bucket") == info.bucket and params.get("Key") == info.key:
            params.setdefault("IfMatch", info.etag)

    event = "before-parameter-build.s3.GetObject"
    client.meta.events.register(event, _if_match, unique_id="whisper-batch-if-match")
    try:
        last: BaseException | None = None
        for attempt in range(1, max(1, attempts) + 1):
            try:
                config = TransferConfig(use_threads=True, max_concurrency=4)
                with create_transfer_manager(client, config) as manager:
                    manager.download(info.bucket, info.key, str(dest), extra_args=extra_args,
                                     subscribers=[_Pin()]).result()
                return dest
            except ClientError as exc:
                code = error_code(exc)
                if code in _NOT_FOUND_CODES:
                    raise MissingInputError(f"input object disappeared before download: {uri}") from None
                if code in _CHANGED_CODES:
                    raise StorageError(
                        f"{uri} changed during the job (ETag {info.etag} no longer matches); "
                        "a retry transcribes the new version") from None
                last = exc
            except WhisperBatchError:
                raise
            except Exception as exc:  # botocore, OS, or s3transfer's wrappers of them
                if _object_changed(exc):
                    raise StorageError(
                        f"{uri} changed during the job (ETag {info.etag} no longer matches); "
                        "a retry transcribes the new version") from None
                if not isinstance(exc, (BotoCoreError, OSError)) and \
                        type(exc).__module__.split(".")[0] not in {"s3transfer", "boto3", "botocore"}:
                    raise
                last = exc
            if attempt < attempts:
                sleep(min(8.0, backoff * 2 ** (attempt - 1)) * (0.5 + random.random() / 2))
        assert last is not None
        raise _storage_error("GET", uri, last) from last
    finally:
        client.meta.events.unregister(event, unique_id="whisper-batch-if-match")


def _object_changed(exc: BaseException) -> bool:
    """True when ``exc`` (or its cause) says the pinned ETag no longer matches (412)."""
    seen = 0
    cur: BaseException | None = exc
    while cur is not None and seen < 8:
        if error_code(cur) in _CHANGED_CODES or "match expected ETag" in str(cur):
            return True
        cur, seen = cur.__cause__ or cur.__context__, seen + 1
    return False


def get_json(client, bucket: str, key: str) -> dict[str, Any] | None:
    """A small JSON object (a marker or manifest line), or ``None`` if absent or not a JSON object."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        body = client.get_object(Bucket=bucket, Key=key)["Body"].read()
    except ClientError as exc:
        if error_code(exc) in _NOT_FOUND_CODES:
            return None
        raise _storage_error("GET", f"s3://{bucket}/{key}", exc) from exc
    except BotoCoreError as exc:
        raise _storage_error("GET", f"s3://{bucket}/{key}", exc) from exc
    try:
        value = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    return value if isinstance(value, dict) else None


def get_text(client, bucket: str, key: str) -> str:
    """A whole object as UTF-8 text (``MissingInputError`` if absent)."""
    uri = f"s3://{bucket}/{key}"
    with _read_errors("GET", uri, f"object does not exist: {uri}"):
        body = client.get_object(Bucket=bucket, Key=key)["Body"].read()
    return body.decode("utf-8")


_CONTENT_TYPES = {
    ".json": "application/json; charset=utf-8",
    ".txt": "text/plain; charset=utf-8",
    ".srt": "application/x-subrip; charset=utf-8",
    ".vtt": "text/vtt; charset=utf-8",
}


def put_text(client, bucket: str, key: str, text: str, *, metadata: dict[str, str] | None = None,
             tags: dict[str, str] | None = None) -> None:
    """PUT a UTF-8 text object (content type from the extension). ``StorageError`` on failure."""
    from urllib.parse import urlencode

    from botocore.exceptions import BotoCoreError, ClientError

    content_type = _CONTENT_TYPES.get(Path(key).suffix.lower(), "application/octet-stream")
    kwargs: dict[str, Any] = {"Bucket": bucket, "Key": key, "Body": text.encode("utf-8"),
                              "ContentType": content_type}
    if metadata:
        kwargs["Metadata"] = metadata
    if tags:
        kwargs["Tagging"] = urlencode(tags)
    try:
        client.put_object(**kwargs)
    except (ClientError, BotoCoreError) as exc:
        raise _storage_error("PUT", f"s3://{bucket}/{key}", exc) from exc


def delete_keys(client, bucket: str, keys: Iterable[str]) -> list[str]:
    """Delete ``keys`` (absent ones are fine) in one DeleteObjects call; returns keys that failed."""
    from botocore.exceptions import BotoCoreError, ClientError

    keys = list(dict.fromkeys(keys))
    if not keys:
        return []
    try:
        resp = client.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": k} for k in keys], "Quiet": True})
    except (ClientError, BotoCoreError):
        failed = []
        for k in keys:  # fall back to one call per key
            try:
                client.delete_object(Bucket=bucket, Key=k)
            except (ClientError, BotoCoreError):
                failed.append(k)
        return failed
    return [e.get("Key", "") for e in resp.get("Errors", []) or []]
