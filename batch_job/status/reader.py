"""List markers with a paginator and GET their bodies on a thread pool.

A marker GET is a presigned URL sent over the client's own HTTP session (its pool, proxies and CA
bundle), through the ``before-send`` hook botocore's endpoint fires (so stubs and moto still
answer): about half the client CPU of ``get_object``, which parses every response header into a
modeled response. Anything but a 200 or 404 on that path is asked again with ``get_object`` (with
its retries and error types). A marker gone between the listing and the GET (the job deletes a
stale error marker after writing the transcript) is skipped, not an error.
"""
from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime

from batch_job.job.keys import ERROR_MARKER_SUFFIX, MARKER_SUFFIX
from batch_job.s3io import aws_client, error_code
from batch_job.status.records import MarkerRecord

DEFAULT_THREADS = 32


def s3_client(threads: int, endpoint_url: str | None = None):
    """One S3 client for the whole pool: as many connections as threads; SigV4 presigned URLs."""
    return aws_client("s3", max_pool_connections=threads, endpoint_url=endpoint_url, signature_version="s3v4")


_GONE = frozenset({"NoSuchKey", "404", "NotFound"})


class MarkerGetter:
    """GET small objects' bodies cheaply; ``None`` when the object is gone."""

    def __init__(self, client) -> None:
        self.client = client
        endpoint = getattr(client, "_endpoint", None)
        self.session = getattr(endpoint, "http_session", None)

    def _fast(self, bucket: str, key: str):
        from botocore.awsrequest import AWSRequest

        url = self.client.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=900)
        request = AWSRequest(method="GET", url=url).prepare()
        stubbed = self.client.meta.events.emit_until_response("before-send.s3.GetObject", request=request)[1]
        return stubbed if stubbed is not None else self.session.send(request)

    def body(self, bucket: str, key: str) -> bytes | None:
        if self.session is not None:
            try:
                response = self._fast(bucket, key)
            except Exception:  # noqa: BLE001 - connection error etc.: botocore's call below retries it
                response = None
            if response is not None and response.status_code == 200:
                return response.content
            if response is not None and response.status_code == 404:
                return None
        try:
            return self.client.get_object(Bucket=bucket, Key=key)["Body"].read()
        except Exception as exc:
            if error_code(exc) in _GONE:
                return None
            raise


def list_keys(client, bucket: str, prefix: str, since: datetime | None = None) -> Iterator[str]:
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", ()):
            if since is None or obj["LastModified"] >= since:
                yield obj["Key"]


def _record(getter: MarkerGetter, bucket: str, prefix: str, key: str) -> MarkerRecord | None:
    raw = getter.body(bucket, key)
    if raw is None:
        return None
    body = json.loads(raw)
    if key.endswith(ERROR_MARKER_SUFFIX):
        return MarkerRecord.failed(key[len(prefix):-len(ERROR_MARKER_SUFFIX)], body)
    return MarkerRecord.done(key[len(prefix):-len(MARKER_SUFFIX)], body)


def read_markers(client, bucket: str, prefix: str, *, threads: int = DEFAULT_THREADS,
                 since: datetime | None = None,
                 progress: Callable[[int], None] | None = None) -> list[MarkerRecord]:
    keys = [k for k in list_keys(client, bucket, prefix, since)
            if k.endswith(MARKER_SUFFIX) and "/_manifests/" not in f"/{k[len(prefix):]}"]
    out: list[MarkerRecord] = []
    getter = MarkerGetter(client)
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for n, rec in enumerate(pool.map(lambda k: _record(getter, bucket, prefix, k), keys), 1):
            if rec is not None:
                out.append(rec)
            if progress is not None and (n % 500 == 0 or n == len(keys)):
                progress(n)
    return out


def stderr_progress(total: int | None = None) -> Callable[[int], None]:
    """A tqdm bar on stderr fed with the running count of markers read."""
    from tqdm import tqdm

    bar = tqdm(total=total, unit="marker", file=sys.stderr, desc="reading markers")

    def show(n: int) -> None:
        bar.update(n - bar.n)
        if total is not None and n >= total:
            bar.close()
    return show
