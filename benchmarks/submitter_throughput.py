"""Submitter handler throughput against moto: batches of 100 SQS records (S3 notifications).

Everything in-process: moto (S3, DynamoDB idempotency table, Batch in its docker-free mode)
behind real boto3 clients, the real handler with powertools Logger/Metrics/idempotency records
(Tracer disabled, as without X-Ray). Per new object: one conditional PutItem (claim) and one
UpdateItem (complete); per job: a manifest PutObject (packs of 2 or more) and one SubmitJob.
Per duplicate: one PutItem whose condition fails.

    python benchmarks/submitter_throughput.py [--rounds 5] [--batch 100]

Prints a table: jobs per batch, records/s (records / handler wall time, median over rounds)
and ms per record (median wall / records). Target: >= 200 records/s (packed, moto Batch).
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

        def run(label: str, clients: Clients, duplicate: bool, persistence=None, **settings) -> dict:
            app.configure(settings=SubmitterSettings.from_env().replace(**settings), clients=clients)
            if persistence is not None:
                from submitter.jobs import Submitter

                app._submitter = Submitter(app.SETTINGS, clients, persistence=persistence)
            walls: list[float] = []
            jobs = 0
            for r in range(args.rounds + 1):  # round 0 warms up (first client calls, imports)
                tag = "warm" if r == 0 else f"r{r}"
                keys = [f"uploads/{label}/{tag}/meeting {i:04d}.wav" for i in range(args.batch)]
                event = sqs_event(*(s3_notification(s3_record(k, size=1_000_000, etag=f"{tag}{i:032x}"))
                                    for i, k in enumerate(keys)))
                if duplicate:  # submit once (not timed), then time the redelivery
                    with redirect_stdout(sink):
                        app.handler(event, LambdaContext(remaining_ms=900_000))
                seen: list = []
                app.set_on_outcome(seen.append)
                t0 = time.perf_counter()
                with redirect_stdout(sink):
                    response = app.handler(event, LambdaContext(remaining_ms=900_000))
                wall = time.perf_counter() - t0
                app.set_on_outcome(None)
                assert response == {"batchItemFailures": []}, response
                jobs = len({o.job_id for o in seen if o.status == "submitted"})
                if r > 0:  # round 0 warms up
                    walls.append(wall)
            wall = statistics.median(walls)
            return {"scenario": label, "records": args.batch, "jobs": jobs, "wall_s": wall,
                    "rps": args.batch / wall, "ms": wall / args.batch * 1000}

        rows = [
            run("new objects, moto Batch", Clients.create(session=session), duplicate=False),
            run("one job per object", Clients.create(session=session), duplicate=False, pack_max_objects=1),
            run("duplicates (redelivery)", Clients.create(session=session), duplicate=True),
            run("new objects, stub Batch", Clients.create(batch=RecordingBatch(), session=session),
                duplicate=False),
            run("handler only (no AWS)", Clients.create(batch=RecordingBatch(), session=session),
                duplicate=False, persistence=memory_persistence()),
        ]

    header = f"{'scenario':<26} {'records':>7} {'jobs':>5} {'wall s':>7} {'records/s':>10} {'ms/record':>9}"
    print(header)
    print("-" * len(header))
    for row in rows:
        print(f"{row['scenario']:<26} {row['records']:>7} {row['jobs']:>5} {row['wall_s']:>7.3f} "
              f"{row['rps']:>10.1f} {row['ms']:>9.2f}")
    ok = rows[0]["rps"] >= TARGET_RPS
    print(f"\ntarget >= {TARGET_RPS:.0f} records/s (new objects, moto Batch): {'met' if ok else 'NOT met'} "
          f"({args.rounds} rounds of {args.batch}, median; python {sys.version.split()[0]}, "
          f"{os.cpu_count()} CPUs)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
