"""Per-job (and per-invocation, for the server) CloudWatch metrics: Embedded Metric Format lines on stdout, or batched PutMetricData.

``emf`` (default): one JSON line per job on stdout. Batch ships container output to CloudWatch
Logs, which extracts the metrics from any ``_aws`` document (no agent, no API call, no IAM
``cloudwatch:PutMetricData`` needed). ``put``: the same datums through ``PutMetricData``, in as
few calls as the API allows. ``off``: nothing.

Every metric has the dimension ``Service=<settings.metrics_service>``. ``JobsFailed`` is
published twice: with ``Service`` alone (for one alarm on all failures) and with
``Service, Reason`` (which reason). Publishing never fails the job: errors are returned/logged.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import IO, Any

#: PutMetricData accepts at most this many datums per call (the 2023+ limit is 1000; 20 is the
#: historical one that every S3/CloudWatch stand-in accepts; a job emits fewer than 10).
MAX_DATUMS_PER_CALL = 20


@dataclass(frozen=True)
class Metric:
    name: str
    value: float
    unit: str = "None"
    #: Extra dimensions on top of ``Service``; each tuple is one dimension set.
    dimension_sets: tuple[tuple[str, ...], ...] = ((),)


@dataclass
class JobMetrics:
    """The metrics of one job, plus the dimension values they refer to."""

    service: str
    namespace: str
    metrics: list[Metric] = field(default_factory=list)
    dimensions: dict[str, str] = field(default_factory=dict)
    properties: dict[str, Any] = field(default_factory=dict)
    timestamp_ms: int = field(default_factory=lambda: int(time.time() * 1000))

    def add(self, name: str, value: float, unit: str = "None",
            dimension_sets: Sequence[Sequence[str]] = ((),)) -> None:
        self.metrics.append(Metric(name, float(value), unit, tuple(tuple(d) for d in dimension_sets)))


#: (figure, metric name, unit) of one object's document; figures absent from a job are skipped.
OBJECT_FIGURES = (
    ("audio_seconds", "AudioSeconds", "Seconds"),
    ("processing_seconds", "ProcessingSeconds", "Seconds"),
    ("real_time_factor", "RealTimeFactor", "None"),
    ("model_load_seconds", "ModelLoadSeconds", "Seconds"),
    ("neuroncore_utilization_avg", "NeuronCoreUtilization", "Percent"),
    ("neuroncore_utilization_peak", "NeuronCoreUtilizationPeak", "Percent"),
)
#: The same for a pack job's one document: objects in the pack, audio transcribed, wall time
#: (job start to end, model load and S3 included), audio seconds per wall second, the one load.
PACK_FIGURES = (
    ("objects", "PackObjects", "Count"),
    ("audio_seconds", "PackAudioSeconds", "Seconds"),
    ("wall_seconds", "PackWallSeconds", "Seconds"),
    ("throughput", "PackThroughput", "None"),
    ("model_load_seconds", "ModelLoadSeconds", "Seconds"),
)

#: One invocation of the serving endpoint (``whisper-batch serve``): the request's audio, its wall
#: time (body received to response ready), its wait for a first batch, and the mean share of its
#: batches' rows that held a window (any request's; the rest was padding).
INVOCATION_FIGURES = (
    ("audio_seconds", "InvocationAudioSeconds", "Seconds"),
    ("wall_seconds", "InvocationWallSeconds", "Seconds"),
    ("queue_seconds", "InvocationQueueSeconds", "Seconds"),
    ("batch_fill", "BatchFill", "None"),
)


def _from_figures(settings, table, figures: Mapping[str, Any] | None,
                  properties: Mapping[str, Any] | None) -> JobMetrics:
    m = JobMetrics(service=settings.metrics_service, namespace=settings.metrics_namespace,
                   properties=dict(properties or {}))
    f = dict(figures or {})
    for key, name, unit in table:
        if f.get(key) is not None:
            m.add(name, f[key], unit)
    return m


def job_metrics(settings, *, succeeded: bool, reason: str | None = None,
                figures: Mapping[str, Any] | None = None,
                properties: Mapping[str, Any] | None = None) -> JobMetrics:
    """One object's metrics from its figures (see :mod:`batch_job.job`), plus JobsSucceeded/JobsFailed."""
    m = _from_figures(settings, OBJECT_FIGURES, figures, properties)
    if succeeded:
        m.add("JobsSucceeded", 1, "Count")
    else:
        m.dimensions["Reason"] = reason or "internal_error"
        m.add("JobsFailed", 1, "Count", dimension_sets=((), ("Reason",)))
    return m


def pack_metrics(settings, *, figures: Mapping[str, Any],
                 properties: Mapping[str, Any] | None = None) -> JobMetrics:
    """A pack job's one document (on top of one per object): :data:`PACK_FIGURES`."""
    return _from_figures(settings, PACK_FIGURES, figures, properties)


def invocation_metrics(settings, *, succeeded: bool, reason: str | None = None,
                       figures: Mapping[str, Any] | None = None,
                       properties: Mapping[str, Any] | None = None) -> JobMetrics:
    """One invocation's metrics (:data:`INVOCATION_FIGURES`), plus Invocations and, on failure,
    InvocationsFailed (with ``Service`` alone and with ``Service, Reason``, as JobsFailed)."""
    m = _from_figures(settings, INVOCATION_FIGURES, figures, properties)
    m.add("Invocations", 1, "Count")
    if not succeeded:
        m.dimensions["Reason"] = reason or "internal_error"
        m.add("InvocationsFailed", 1, "Count", dimension_sets=((), ("Reason",)))
    return m


def emf_document(m: JobMetrics) -> dict[str, Any]:
    """The EMF JSON document: one directive per distinct dimension layout."""
    layouts: dict[tuple[tuple[str, ...], ...], list[dict[str, str]]] = {}
    for metric in m.metrics:
        sets = tuple(("Service",) + extra for extra in metric.dimension_sets)
        layouts.setdefault(sets, []).append({"Name": metric.name, "Unit": metric.unit})
    doc: dict[str, Any] = dict(m.properties)
    doc.update({
        "_aws": {
            "Timestamp": m.timestamp_ms,
            "CloudWatchMetrics": [
                {"Namespace": m.namespace, "Dimensions": [list(s) for s in sets], "Metrics": metrics}
                for sets, metrics in layouts.items()
            ],
        },
        "Service": m.service,
        **m.dimensions,
    })
    for metric in m.metrics:
        doc[metric.name] = metric.value
    return doc


def metric_data(m: JobMetrics) -> list[dict[str, Any]]:
    """PutMetricData datums: one per (metric, dimension set)."""
    from datetime import datetime, timezone

    ts = datetime.fromtimestamp(m.timestamp_ms / 1000, tz=timezone.utc)
    out = []
    for metric in m.metrics:
        for extra in metric.dimension_sets:
            dims = [{"Name": "Service", "Value": m.service}]
            dims += [{"Name": d, "Value": str(m.dimensions[d])} for d in extra]
            out.append({"MetricName": metric.name, "Dimensions": dims, "Timestamp": ts,
                        "Value": metric.value, "Unit": metric.unit})
    return out


def _chunks(items: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def publish(m: JobMetrics, mode: str, *, stream: IO[str] | None = None, cloudwatch=None) -> str | None:
    """Publish ``m`` in ``mode`` (``emf``/``put``/``off``). Returns an error message, or ``None``."""
    mode = (mode or "emf").lower()
    if mode == "off" or not m.metrics:
        return None
    if mode == "emf":
        out = stream if stream is not None else sys.stdout
        out.write(json.dumps(emf_document(m), separators=(",", ":")) + "\n")
        out.flush()
        return None
    if mode == "put":
        try:
            if cloudwatch is None:
                from batch_job.s3io import aws_client

                cloudwatch = aws_client("cloudwatch")
            for chunk in _chunks(metric_data(m), MAX_DATUMS_PER_CALL):
                cloudwatch.put_metric_data(Namespace=m.namespace, MetricData=list(chunk))
        except Exception as exc:  # metrics must never fail the job
            return f"PutMetricData failed: {type(exc).__name__}: {exc}"
        return None
    return f"unknown metrics_mode {mode!r} (use emf, put or off)"
