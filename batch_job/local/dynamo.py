"""The idempotency store: ``moto_server``'s DynamoDB on loopback, table created like the stack.

The submitter's idempotency layer (powertools ``DynamoDBPersistenceLayer``) talks to it through
an ordinary boto3 DynamoDB client, so the handler runs exactly as deployed. The table mirrors
``IdempotencyTable`` in cloudformation/template.yaml: partition key ``id`` (S), on-demand, TTL on
``expiration``.

moto keeps its state in memory: records last for one run of ``whisper-batch local``. Across
restarts the watcher's own memory (objects already delivered) and the worker's completion
marker (same ETag -> skip) keep objects from being transcribed twice.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

from batch_job.local import ACCESS_KEY_ID, LOOPBACK, REGION, SECRET_ACCESS_KEY, free_port, state_dir
from batch_job.local.s3server import ManagedProcess, ServerError

DEFAULT_TABLE = "whisper-batch-idempotency"


def create_idempotency_table(client: Any, table: str = DEFAULT_TABLE) -> None:
    """``id`` (S) hash key, PAY_PER_REQUEST, TTL attribute ``expiration`` (as the stack)."""
    try:
        client.create_table(
            TableName=table,
            KeySchema=[{"AttributeName": "id", "KeyType": "HASH"}],
            AttributeDefinitions=[{"AttributeName": "id", "AttributeType": "S"}],
            BillingMode="PAY_PER_REQUEST",
        )
    except client.exceptions.ResourceInUseException:
        pass
    client.get_waiter("table_exists").wait(TableName=table, WaiterConfig={"Delay": 0.2, "MaxAttempts": 50})
    client.update_time_to_live(TableName=table,
                               TimeToLiveSpecification={"AttributeName": "expiration", "Enabled": True})


class DynamoServer:
    """``moto_server`` (all of moto; only DynamoDB is used) on ``127.0.0.1:port``."""

    def __init__(self, data_dir: str | Path, port: int | None = None, *, table: str = DEFAULT_TABLE) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.requested_port = port
        self.port = port or 0
        self.table = table
        self.process: ManagedProcess | None = None

    @property
    def endpoint_url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def launch(self) -> None:
        self.port = self.requested_port or free_port()
        env = dict(os.environ)
        env.pop("AWS_ENDPOINT_URL", None)
        argv = [sys.executable, "-m", "moto.server", "-H", LOOPBACK, "-p", str(self.port)]
        self.process = ManagedProcess("moto_server", argv, state_dir(self.data_dir) / "logs" / "dynamodb.log", env)
        self.process.start()

    def client(self):
        import boto3
        from botocore.config import Config

        return boto3.session.Session().client(
            "dynamodb", endpoint_url=self.endpoint_url, region_name=REGION,
            aws_access_key_id=ACCESS_KEY_ID, aws_secret_access_key=SECRET_ACCESS_KEY,
            config=Config(retries={"mode": "standard", "max_attempts": 5}, connect_timeout=5, read_timeout=15),
        )

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Wait for the port, then create the table (retrying while the server warms up)."""
        assert self.process is not None
        self.process.wait_listening(self.port, timeout, "moto_server")
        deadline = time.monotonic() + timeout
        while True:
            try:
                create_idempotency_table(self.client(), self.table)
                return
            except Exception as exc:  # noqa: BLE001 - retried until the deadline
                if time.monotonic() > deadline or not self.process.alive():
                    raise ServerError(f"cannot create the idempotency table on moto_server: {exc}") from exc
                time.sleep(0.2)

    def start(self, timeout: float = 30.0) -> DynamoServer:
        self.launch()
        self.wait_ready(timeout)
        return self

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
            self.process = None
