"""submitter/queue_metrics.py: the scheduled queue-depth publisher (RUNNABLE jobs -> CloudWatch).

Against moto (Batch in its docker-free mode, where jobs finish at once: the test sets their states in
moto's backend, RUNNABLE being the state a job waiting for inf2 capacity is in), plus a paged
ListJobs stand-in for the pagination moto does not do, and the template wiring of the function.
"""

from __future__ import annotations

import pytest

from submitter import queue_metrics

REGION = "eu-west-1"
NAMESPACE = "WhisperBatchTest"


@pytest.fixture
def aws(monkeypatch):
    import boto3
    from moto import mock_aws

    for key in ("AWS_ENDPOINT_URL", "AWS_PROFILE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    with mock_aws(config={"batch": {"use_docker": False}}):
        yield boto3.session.Session(region_name=REGION)


def _queue_with_jobs(session, statuses: list[str]) -> str:
    """A job queue whose jobs have ``statuses``; returns the queue ARN."""
    from moto.batch.models import batch_backends
    from moto.core import DEFAULT_ACCOUNT_ID

    role = session.client("iam").create_role(RoleName="batch", AssumeRolePolicyDocument="{}")["Role"]["Arn"]
    batch = session.client("batch")
    env = batch.create_compute_environment(computeEnvironmentName="inf2", type="UNMANAGED", state="ENABLED",
                                           serviceRole=role)
    queue = batch.create_job_queue(jobQueueName="wb-queue", state="ENABLED", priority=1, computeEnvironmentOrder=[
        {"order": 1, "computeEnvironment": env["computeEnvironmentArn"]}])["jobQueueArn"]
    batch.register_job_definition(jobDefinitionName="wb", type="container", containerProperties={
        "image": "whisper-batch:t", "command": ["run-job"],
        "resourceRequirements": [{"type": "VCPU", "value": "2"}, {"type": "MEMORY", "value": "7168"}]})
    ids = [batch.submit_job(jobName=f"pack-{i}", jobQueue=queue, jobDefinition="wb")["jobId"]
           for i in range(len(statuses))]
    backend = batch_backends[DEFAULT_ACCOUNT_ID][REGION]
    for job_id, status in zip(ids, statuses):
        backend.get_job_by_id(job_id).status = status  # docker-free moto: SUCCEEDED at once otherwise
    return queue


def test_handler_publishes_the_runnable_count(aws):
    queue = _queue_with_jobs(aws, ["RUNNABLE", "RUNNABLE", "RUNNING", "RUNNABLE", "SUCCEEDED"])
    env = {"JOB_QUEUE": queue, "METRICS_NAMESPACE": NAMESPACE, "METRICS_SERVICE": "wb"}
    cloudwatch = aws.client("cloudwatch")
    out = queue_metrics.handler({}, None, batch=aws.client("batch"), cloudwatch=cloudwatch, environ=env)
    assert out == {"queue": queue, "runnable": 3, "capped": False, "namespace": NAMESPACE}
    metrics = cloudwatch.list_metrics(Namespace=NAMESPACE)["Metrics"]
    assert [(m["MetricName"], m["Dimensions"]) for m in metrics] == [
        (queue_metrics.RUNNABLE_METRIC, [{"Name": "Service", "Value": "wb"}])]
    stats = cloudwatch.get_metric_statistics(
        Namespace=NAMESPACE, MetricName=queue_metrics.RUNNABLE_METRIC, Dimensions=[{"Name": "Service", "Value": "wb"}],
        StartTime="2000-01-01T00:00:00Z", EndTime="2100-01-01T00:00:00Z", Period=60, Statistics=["Maximum"])
    assert [p["Maximum"] for p in stats["Datapoints"]] == [3.0]


def test_empty_queue_publishes_zero(aws):
    """Zero is a datapoint, not a gap: the widget shows a drained queue as 0."""
    queue = _queue_with_jobs(aws, ["SUCCEEDED"])
    cloudwatch = aws.client("cloudwatch")
    out = queue_metrics.handler({}, None, batch=aws.client("batch"), cloudwatch=cloudwatch,
                                environ={"JOB_QUEUE": queue, "METRICS_NAMESPACE": NAMESPACE})
    assert out["runnable"] == 0
    stats = cloudwatch.get_metric_statistics(
        Namespace=NAMESPACE, MetricName=queue_metrics.RUNNABLE_METRIC,
        Dimensions=[{"Name": "Service", "Value": "whisper-batch"}],  # the default service
        StartTime="2000-01-01T00:00:00Z", EndTime="2100-01-01T00:00:00Z", Period=60, Statistics=["Maximum"])
    assert [p["Maximum"] for p in stats["Datapoints"]] == [0.0]


class PagedBatch:
    """ListJobs in pages of ``page`` jobs, as AWS pages it (moto returns one page)."""

    def __init__(self, total: int, page: int = 100) -> None:
        self.total, self.page, self.calls = total, page, []

    def get_paginator(self, name: str):
        import boto3
        from botocore.stub import Stubber

        client = boto3.client("batch", region_name=REGION, aws_access_key_id="x", aws_secret_access_key="x")
        stub = Stubber(client)
        starts = list(range(0, self.total, self.page)) or [0]
        for n, start in enumerate(starts):
            count = min(self.page, self.total - start)
            response = {"jobSummaryList": [{"jobId": f"j{start + i}", "jobName": "p"} for i in range(count)]}
            if n + 1 < len(starts):
                response["nextToken"] = f"t{n + 1}"
            expected = {"jobQueue": "q", "jobStatus": "RUNNABLE"}
            if n:
                expected["nextToken"] = f"t{n}"
            stub.add_response("list_jobs", response, expected)
        stub.activate()
        self.stub = stub
        return client.get_paginator(name)


def test_count_follows_every_page():
    batch = PagedBatch(total=250)
    assert queue_metrics.count_jobs(batch, "q") == (250, False)
    batch.stub.assert_no_pending_responses()  # all three pages were read, with their tokens


def test_count_stops_at_the_page_cap_and_says_so():
    assert queue_metrics.count_jobs(PagedBatch(total=500), "q", max_pages=2) == (200, True)
    # Exactly at the cap with nothing after it is a full count, not a lower bound.
    assert queue_metrics.count_jobs(PagedBatch(total=200), "q", max_pages=2) == (200, False)


def test_missing_queue_is_a_clear_config_error():
    with pytest.raises(queue_metrics.ConfigError, match="JOB_QUEUE is not set"):
        queue_metrics.handler({}, None, batch=object(), cloudwatch=object(), environ={})


def test_template_runs_it_every_minute_with_its_queue_and_namespace():
    from test_template import load_template

    resources = load_template()["Resources"]
    fn = resources["QueueMetricsFunction"]["Properties"]
    module, func = fn["Handler"].rsplit(".", 1)
    assert module == queue_metrics.__name__ and callable(getattr(queue_metrics, func))
    env = fn["Environment"]["Variables"]
    assert env["JOB_QUEUE"] == {"Ref": "JobQueue"}
    assert env["METRICS_NAMESPACE"] == {"Ref": "MetricsNamespace"}
    # The service the dashboard widget filters on.
    assert env["METRICS_SERVICE"] == "whisper-batch"
    rule = resources["QueueMetricsSchedule"]["Properties"]
    assert rule["ScheduleExpression"] == "rate(1 minute)" and rule["State"] == "ENABLED"
    assert rule["Targets"][0]["Arn"] == {"Fn::GetAtt": ["QueueMetricsFunction", "Arn"]}
    permission = resources["QueueMetricsInvokePermission"]["Properties"]
    assert permission["Principal"] == "events.amazonaws.com"
    assert permission["SourceArn"] == {"Fn::GetAtt": ["QueueMetricsSchedule", "Arn"]}
    assert fn["ReservedConcurrentExecutions"] == 1  # one count a minute, never two at once


def test_module_imports_nothing_of_the_submitter():
    """It ships in the submitter zip but must not load submitter.app (powertools, settings at cold start)."""
    import ast
    from pathlib import Path

    tree = ast.parse(Path(queue_metrics.__file__).read_text(encoding="utf-8"))
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not any(name.startswith(("submitter", "batch_job", "aws_lambda_powertools")) for name in imported), imported


def test_function_environment_is_what_the_module_reads():
    from pathlib import Path

    from test_template import ENV_READ, load_template

    reads = set(ENV_READ.findall(Path(queue_metrics.__file__).read_text(encoding="utf-8")))
    assert reads == {"JOB_QUEUE", "METRICS_NAMESPACE", "METRICS_SERVICE"}, reads
    env = load_template()["Resources"]["QueueMetricsFunction"]["Properties"]["Environment"]["Variables"]
    assert set(env) == reads
