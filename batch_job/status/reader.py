"""List markers with a paginator and GET their bodies on a thread pool."""
from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime

from batch_job.job.keys import ERROR_MARKER_SUFFIX, MARKER_SUFFIX
from batch_job.s3io import aws_client
from batch_job.status.records import MarkerRecord

DEFAULT_THREADS = 32


def s3_client(threads: int, endpoint_url: str | None = None):
    """One S3 client for the whole pool: as many connections as threads."""
    return aws_client("s3", max_pool_connections=threads, endpoint_url=endpoint_url)


def list_keys(client, bucket: str, prefix: str, since: datetime | None = None) -> Iterator[str]:
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", ()):
            if since is None or obj["LastModified"] >= since:
                yield obj["Key"]


def _record(client, bucket: str, prefix: str, key: str) -> MarkerRecord | None:
    body = json.loads(client.get_object(Bucket=bucket, Key=key)["Body"].read())
    if key.endswith(ERROR_MARKER_SUFFIX):
        return MarkerRecord.failed(key[len(prefix):-len(ERROR_MARKER_SUFFIX)], body)
    return MarkerRecord.done(key[len(prefix):-len(MARKER_SUFFIX)], body)


def read_markers(client, bucket: str, prefix: str, *, threads: int = DEFAULT_THREADS,
                 since: datetime | None = None,
                 progress: Callable[[int], None] | None = None) -> list[MarkerRecord]:
    keys = [k for k in list_keys(client, bucket, prefix, since)
            if k.endswith(MARKER_SUFFIX) and "/_manifests/" not in f"/{k[len(prefix):]}"]
    out: list[MarkerRecord] = []
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for n, rec in enumerate(pool.map(lambda k: _record(client, bucket, prefix, k), keys), 1):
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
