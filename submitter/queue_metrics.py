"""Queue depth for the dashboard: RUNNABLE jobs of the stack's AWS Batch job queue, every minute.

AWS Batch publishes no queue-depth metric, and RUNNABLE (submitted, waiting for an instance) is the
state a backfill with no inf2 capacity sits in. The stack runs :func:`handler` from an EventBridge
schedule (``rate(1 minute)``): it counts the queue's RUNNABLE jobs with ``batch:ListJobs``
(paginated) and publishes :data:`RUNNABLE_METRIC` with the dimension ``Service`` to the job's
namespace, where the dashboard's queue-depth widget reads it.

Environment: ``JOB_QUEUE`` (name or ARN), ``METRICS_NAMESPACE`` (default ``WhisperBatch``),
``METRICS_SERVICE`` (default ``whisper-batch``). Only boto3 (the Lambda runtime's) is imported, so
the function ships in the submitter's zip without loading the submitter itself.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

#: The metric the dashboard's queue-depth widget names (unit Count, dimension Service).
RUNNABLE_METRIC = "RunnableJobs"
#: Every metric this module publishes (tests/test_dashboard.py reads it).
METRIC_NAMES = (RUNNABLE_METRIC,)
#: Pages of ListJobs (100 jobs each) counted at most per run, so one run stays well inside its
#: timeout; a count that hits the cap is published as a lower bound and logged as such.
MAX_PAGES = 200

logger = logging.getLogger(__name__)
logger.setLevel(logging.INFO)


class ConfigError(RuntimeError):
    """The function's environment is incomplete."""


def count_jobs(batch, queue: str, status: str = "RUNNABLE", max_pages: int = MAX_PAGES) -> tuple[int, bool]:
    """Jobs of ``queue`` in ``status`` and whether the count stopped at ``max_pages`` (a lower bound)."""
    count = 0
    pages = batch.get_paginator("list_jobs").paginate(jobQueue=queue, jobStatus=status)
    for number, page in enumerate(pages, start=1):
        count += len(page.get("jobSummaryList", []))
        if number >= max_pages and page.get("nextToken"):
            return count, True
    return count, False


def publish_depth(cloudwatch, namespace: str, service: str, runnable: int) -> None:
    """One PutMetricData: :data:`RUNNABLE_METRIC` = ``runnable`` with ``Service=service``."""
    cloudwatch.put_metric_data(Namespace=namespace, MetricData=[{
        "MetricName": RUNNABLE_METRIC,
        "Dimensions": [{"Name": "Service", "Value": service}],
        "Value": float(runnable),
        "Unit": "Count",
    }])


def _config(environ: Mapping[str, str]) -> tuple[str, str, str]:
    queue = environ.get("JOB_QUEUE", "").strip()
    if not queue:
        raise ConfigError("JOB_QUEUE is not set (the stack sets it to its job queue's ARN)")
    return (queue, environ.get("METRICS_NAMESPACE") or "WhisperBatch",
            environ.get("METRICS_SERVICE") or "whisper-batch")


def handler(event: Any, context: Any, *, batch=None, cloudwatch=None,
            environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Count RUNNABLE jobs and publish them; returns what was published (for logs and tests)."""
    queue, namespace, service = _config(os.environ if environ is None else environ)
    if batch is None or cloudwatch is None:
        import boto3

        batch = batch or boto3.client("batch")
        cloudwatch = cloudwatch or boto3.client("cloudwatch")
    runnable, capped = count_jobs(batch, queue)
    if capped:
        logger.warning("more than %d RUNNABLE jobs in %s: published count is a lower bound", runnable, queue)
    publish_depth(cloudwatch, namespace, service, runnable)
    logger.info("queue %s: %d RUNNABLE jobs -> %s/%s", queue, runnable, namespace, RUNNABLE_METRIC)
    return {"queue": queue, "runnable": runnable, "capped": capped, "namespace": namespace}
