"""Per-job metrics: EMF documents and batched PutMetricData (moto CloudWatch)."""

from __future__ import annotations

import io
import json

import pytest

from batch_job.metrics import MAX_DATUMS_PER_CALL, emf_document, job_metrics, metric_data, publish
from batch_job.settings import Settings

FIGURES = {"audio_seconds": 11.0, "processing_seconds": 2.2, "real_time_factor": 0.2, "model_load_seconds": 0.9,
           "neuroncore_utilization_avg": 55.5, "neuroncore_utilization_peak": 91.0}


def test_success_emf_document():
    m = job_metrics(Settings(), succeeded=True, figures=FIGURES, properties={"JobId": "j-1"})
    stream = io.StringIO()
    assert publish(m, "emf", stream=stream) is None
    (line,) = stream.getvalue().splitlines()
    doc = json.loads(line)
    (directive,) = doc["_aws"]["CloudWatchMetrics"]
    assert directive["Namespace"] == "WhisperBatch" and directive["Dimensions"] == [["Service"]]
    units = {m["Name"]: m["Unit"] for m in directive["Metrics"]}
    assert units == {"AudioSeconds": "Seconds", "ProcessingSeconds": "Seconds", "RealTimeFactor": "None",
                     "ModelLoadSeconds": "Seconds", "NeuronCoreUtilization": "Percent",
                     "NeuronCoreUtilizationPeak": "Percent", "JobsSucceeded": "Count"}
    assert doc["Service"] == "whisper-batch" and doc["JobId"] == "j-1"
    assert doc["AudioSeconds"] == 11.0 and doc["NeuronCoreUtilizationPeak"] == 91.0 and doc["JobsSucceeded"] == 1
    assert isinstance(doc["_aws"]["Timestamp"], int)


def test_failure_has_reason_dimension_and_a_total():
    m = job_metrics(Settings(metrics_namespace="NS", metrics_service="svc"), succeeded=False,
                    reason="too_long", figures={"audio_seconds": None})
    doc = emf_document(m)
    (directive,) = doc["_aws"]["CloudWatchMetrics"]
    assert directive["Dimensions"] == [["Service"], ["Service", "Reason"]]
    assert [x["Name"] for x in directive["Metrics"]] == ["JobsFailed"]
    assert doc["Reason"] == "too_long" and doc["Service"] == "svc" and doc["JobsFailed"] == 1
    datums = metric_data(m)
    assert [{d["Name"]: d["Value"] for d in x["Dimensions"]} for x in datums] == [
        {"Service": "svc"}, {"Service": "svc", "Reason": "too_long"}]


def test_mixed_layouts_get_separate_directives():
    m = job_metrics(Settings(), succeeded=False, reason="s3_error", figures={"audio_seconds": 3.0})
    layouts = [d["Dimensions"] for d in emf_document(m)["_aws"]["CloudWatchMetrics"]]
    assert layouts == [[["Service"]], [["Service"], ["Service", "Reason"]]]


def test_off_mode_and_unknown_mode():
    m = job_metrics(Settings(), succeeded=True, figures=FIGURES)
    stream = io.StringIO()
    assert publish(m, "off", stream=stream) is None and stream.getvalue() == ""
    assert "unknown metrics_mode" in publish(m, "statsd", stream=stream)


@pytest.fixture
def cloudwatch(monkeypatch):
    moto = pytest.importorskip("moto")
    import boto3

    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    with moto.mock_aws():
        yield boto3.client("cloudwatch")


def test_put_mode_publishes_to_cloudwatch(cloudwatch):
    m = job_metrics(Settings(), succeeded=True, figures=FIGURES)
    assert publish(m, "put", cloudwatch=cloudwatch) is None
    names = {x["MetricName"] for x in cloudwatch.list_metrics(Namespace="WhisperBatch")["Metrics"]}
    assert names == {"AudioSeconds", "ProcessingSeconds", "RealTimeFactor", "ModelLoadSeconds",
                     "NeuronCoreUtilization", "NeuronCoreUtilizationPeak", "JobsSucceeded"}


def test_put_mode_batches_calls(cloudwatch):
    m = job_metrics(Settings(), succeeded=True)
    for i in range(MAX_DATUMS_PER_CALL * 2 + 3):
        m.add(f"Extra{i}", i)
    calls = []
    cloudwatch.meta.events.register("before-parameter-build.cloudwatch.PutMetricData",
                                    lambda params, **kw: calls.append(len(params["MetricData"])))
    assert publish(m, "put", cloudwatch=cloudwatch) is None
    assert calls == [MAX_DATUMS_PER_CALL, MAX_DATUMS_PER_CALL, 4]


def test_put_failure_is_reported_not_raised():
    class Broken:
        def put_metric_data(self, **kw):
            raise RuntimeError("AccessDenied")

    m = job_metrics(Settings(), succeeded=True, figures=FIGURES)
    assert "AccessDenied" in publish(m, "put", cloudwatch=Broken())
