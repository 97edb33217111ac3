"""Submitter handler throughput against moto: batches of 100 SQS records (S3 notifications).

Everything in-process: moto (S3, DynamoDB idempotency table, Batch in its docker-free mode)
behind real boto3 clients, the real handler with powertools Logger/Metrics/BatchProcessor/
idempotency (Tracer disabled, as without X-Ray). Per record: one conditional PutItem, one
SubmitJob, one UpdateItem (new objects), or one PutItem + GetItem (duplicates).

    python benchmarks/submitter_throughput.py [--rounds 5] [--batch 100]

Prints a table: records/s (100 records / handler wall time, median over rounds) and the
p50/p99 time per record (over all rounds). Target: >= 200 records/s.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import time
from contextlib import redirect_stdout
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

TARGET_RPS = 200.0


def memory_persistence():
    """In-memory powertools persistence layer: isolates the handler's own cost from moto's."""
    import datetime as dt

    from aws_lambda_powertools.utilities.idempotency.exceptions import (
        IdempotencyItemAlreadyExistsError,
        IdempotencyItemNotFoundError,
    )
    from aws_lambda_powertools.utilities.idempotency.persistence.base import BasePersistenceLayer

    class MemoryPersistenceLayer(BasePersistenceLayer):
        def __init__(self) -> None:
            super().__init__()
            self.items: dict = {}

        def _get_record(self, idempotency_key):
            try:
                return self.items[idempotency_key]
            except KeyError:
                raise IdempotencyItemNotFoundError from None

        def _put_record(self, data_record) -> None:
            old = self.items.get(data_record.idempotency_key)
            if old is not None and old.expiry_timestamp > dt.datetime.now().timestamp():
                raise IdempotencyItemAlreadyExistsError(old_data_record=old)
            self.items[data_record.idempotency_key] = data_record

        def _update_record(self, data_record) -> None:
            self.items[data_record.idempotency_key] = data_record

        def _delete_record(self, data_record) -> None:
            self.items.pop(data_record.idempotency_key, None)

    return MemoryPersistenceLayer()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=100)
    args = parser.parse_args(argv)

    from test_submitter_support import BUCKET, ENV, POWERTOOLS_ENV  # event builders + env

    os.environ.update({**POWERTOOLS_ENV, **ENV, "LOG_LEVEL": "INFO"})
    import boto3
    from moto import mock_aws
    from test_submitter_support import (
        LambdaContext,
        RecordingBatch,
        create_batch,
        create_table,
        s3_notification,
        s3_record,
        sqs_event,
    )

    with mock_aws(config={"batch": {"use_docker": False}}):
        session = boto3.session.Session(region_name="us-east-1")
        session.client("s3").create_bucket(Bucket=BUCKET)
        create_table(session.client("dynamodb"))
        create_batch(session)

        import submitter.app as app
        from submitter.jobs import Clients
        from submitter.settings import SubmitterSettings

        # Logs and EMF go to a sink: the benchmark measures the handler, not the terminal.
        sink = io.StringIO()
        app.logger.registered_handler.setStream(sink)

        per_record: list[float] = []
        original = app._process_payload

        def timed(payload, tally):
            t0 = time.perf_counter()
            try:
                return original(payload, tally)
            finally:
                per_record.append(time.perf_counter() - t0)

        app._process_payload = timed

        def run(label: str, clients: Clients, duplicate: bool, persistence=None) -> dict:
            app.configure(settings=SubmitterSettings.from_env(), clients=clients)
            if persistence is not None:
                from submitter.jobs import Submitter

                app._submitter = Submitter(app.SETTINGS, clients, persistence=persistence)
            walls: list[float] = []
            per_record.clear()
            for r in range(args.rounds + 1):  # round 0 warms up (first client calls, imports)
                tag = "warm" if r == 0 else f"r{r}"
                keys = [f"uploads/{label}/{tag}/meeting {i:04d}.wav" for i in range(args.batch)]
                event = sqs_event(*(s3_notification(s3_record(k, size=1_000_000, etag=f"{tag}{i:032x}"))
                                    for i, k in enumerate(keys)))
                if duplicate:  # submit once (not timed), then time the redelivery
                    before = len(per_record)
                    with redirect_stdout(sink):
                        app.handler(event, LambdaContext(remaining_ms=900_000))
                    del per_record[before:]
                t0 = time.perf_counter()
                with redirect_stdout(sink):
                    response = app.handler(event, LambdaContext(remaining_ms=900_000))
                wall = time.perf_counter() - t0
                assert response == {"batchItemFailures": []}, response
                if r == 0:
                    per_record.clear()
                    continue
                walls.append(wall)
            times = sorted(per_record)
            p = lambda q: times[min(len(times) - 1, int(q * len(times)))] * 1000  # noqa: E731
            wall = statistics.median(walls)
            return {"scenario": label, "records": args.batch, "wall_s": wall, "rps": args.batch / wall,
                    "p50_ms": p(0.50), "p99_ms": p(0.99)}

        rows = [
            run("new objects, moto Batch", Clients.create(session=session), duplicate=False),
            run("duplicates (redelivery)", Clients.create(session=session), duplicate=True),
            run("new objects, stub Batch", Clients.create(batch=RecordingBatch(), session=session),
                duplicate=False),
            run("handler only (no AWS)", Clients.create(batch=RecordingBatch(), session=session),
                duplicate=False, persistence=memory_persistence()),
        ]

    header = f"{'scenario':<26} {'records':>7} {'wall s':>7} {'records/s':>10} {'p50 ms':>7} {'p99 ms':>7}"
    print(header)
    print("-" * len(header))
    for row in rows:
        print(f"{row['scenario']:<26} {row['records']:>7} {row['wall_s']:>7.3f} {row['rps']:>10.1f} "
              f"{row['p50_ms']:>7.2f} {row['p99_ms']:>7.2f}")
    ok = rows[0]["rps"] >= TARGET_RPS
    print(f"\ntarget >= {TARGET_RPS:.0f} records/s (new objects, moto Batch): {'met' if ok else 'NOT met'} "
          f"({args.rounds} rounds of {args.batch}, median; python {sys.version.split()[0]}, "
          f"{os.cpu_count()} CPUs)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
