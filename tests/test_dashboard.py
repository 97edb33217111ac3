"""The stack's CloudWatch dashboard names only metrics that something actually emits.

The dashboard body (an Fn::Sub of JSON in cloudformation/template.yaml) is rendered, parsed, and
every metric of every widget is resolved to (namespace, metric name, dimension names), from plain
metric rows and from the SEARCH expressions. Each must be one of:

* the job's (batch_job/metrics.py: what ``job_metrics``/``pack_metrics`` build, with their EMF
  dimension sets; figures derived by calling the module, not copied here);
* the submitter's (the ``add_metric`` calls in submitter/app.py, read with ``ast``);
* the queue-depth publisher's (``submitter.queue_metrics.METRIC_NAMES``);
* the host neuron-monitor publisher's namespace (``<MetricsNamespace>/NeuronHost``, as the launch
  template starts it), searched by a word only: its metric names are the Neuron tool's, not ours;
* AWS's own (AWS/SQS, AWS/Lambda), with the dimension value naming a resource of this stack.
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
from test_template import load_template, props

from batch_job import metrics as job_metrics_module
from submitter import queue_metrics

REPO = Path(__file__).resolve().parents[1]
NS = "NS"  # what ${Ns} (the MetricsNamespace parameter) renders to here
HOST_NS = f"{NS}/NeuronHost"

# AWS's metrics this dashboard may use: the documented ones of each namespace, with their dimension.
AWS_METRICS = {
    "AWS/SQS": ({"ApproximateNumberOfMessagesVisible", "ApproximateNumberOfMessagesNotVisible",
                 "ApproximateAgeOfOldestMessage", "NumberOfMessagesSent", "NumberOfMessagesReceived",
                 "NumberOfMessagesDeleted"}, "QueueName"),
    "AWS/Lambda": ({"Invocations", "Errors", "Throttles", "Duration", "ConcurrentExecutions"}, "FunctionName"),
}
# Dimension values of AWS metrics -> the resource attribute they must be (the body's Sub variables).
AWS_DIMENSION_SOURCES = {
    "QueueName": [{"Fn::GetAtt": ["EventQueue", "QueueName"]}, {"Fn::GetAtt": ["EventDeadLetterQueue", "QueueName"]}],
    "FunctionName": [{"Ref": "SubmitterFunction"}, {"Ref": "QueueMetricsFunction"}],
}


# ---------------------------------------------------------------------------- what is emitted
def job_emitted() -> set[tuple[str, frozenset[str]]]:
    """(metric, dimension names) of every document the job writes, built by batch_job.metrics itself."""
    settings = SimpleNamespace(metrics_service="whisper-batch", metrics_namespace=NS)
    every = {key: 1.0 for key, _, _ in job_metrics_module.OBJECT_FIGURES}
    docs = [
        job_metrics_module.job_metrics(settings, succeeded=True, figures=every),
        job_metrics_module.job_metrics(settings, succeeded=False, reason="bad_input", figures=every),
        job_metrics_module.pack_metrics(settings, figures={key: 1.0 for key, _, _ in job_metrics_module.PACK_FIGURES}),
    ]
    out = set()
    for doc in docs:
        for directive in job_metrics_module.emf_document(doc)["_aws"]["CloudWatchMetrics"]:
            assert directive["Namespace"] == NS
            for dims in directive["Dimensions"]:
                out |= {(m["Name"], frozenset(dims)) for m in directive["Metrics"]}
    return out


def submitter_emitted() -> set[tuple[str, frozenset[str]]]:
    """(metric, dimension names) of the submitter's ``add_metric`` calls: ``Service`` (its default
    dimension) plus whatever ``add_dimension`` the same metrics object got in that function."""
    tree = ast.parse((REPO / "submitter" / "app.py").read_text(encoding="utf-8"))
    out = set()

    def kwarg(call: ast.Call, name: str):
        return next((k.value.value for k in call.keywords if k.arg == name and isinstance(k.value, ast.Constant)), None)

    for fn in (n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)):
        calls = [n for n in ast.walk(fn) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
                 and isinstance(n.func.value, ast.Name)]
        dims: dict[str, set[str]] = {}
        for call in calls:
            if call.func.attr == "add_dimension":
                dims.setdefault(call.func.value.id, set()).add(kwarg(call, "name"))
        for call in calls:
            if call.func.attr == "add_metric":
                name = kwarg(call, "name")
                assert name, ast.unparse(call)
                out.add((name, frozenset({"Service"} | dims.get(call.func.value.id, set()))))
    assert out, "no add_metric(name=...) found in submitter/app.py"
    return out


def publisher_emitted() -> set[tuple[str, frozenset[str]]]:
    return {(name, frozenset({"Service"})) for name in queue_metrics.METRIC_NAMES}


def stack_namespace_metrics() -> set[tuple[str, frozenset[str]]]:
    return job_emitted() | submitter_emitted() | publisher_emitted()


# ---------------------------------------------------------------------------- what the dashboard names
def dashboard() -> tuple[list[dict], dict]:
    """The rendered widgets and the body's Sub variables (name -> template value)."""
    body, variables = props(load_template()["Resources"]["Dashboard"])["DashboardBody"]["Fn::Sub"]

    def render(m: re.Match) -> str:
        name = m.group(1)
        if name == "Ns":
            return NS
        if name in variables or name.startswith("AWS::"):
            return "${" + name + "}"  # kept: a dimension value is checked against its source below
        raise AssertionError(f"unresolved ${{{name}}} in the dashboard body")

    rendered = re.sub(r"\$\{([^}]+)\}", render, body)
    return json.loads(rendered)["widgets"], variables


SEARCH = re.compile(r"SEARCH\(\s*'((?:[^'\\]|\\.)*)'")


def parse_search(query: str) -> tuple[str, str | None, frozenset[str] | None]:
    """(namespace, metric name or None for a word search, dimension names or None when not a schema)."""
    schema = re.match(r"\s*\{([^}]*)\}\s*(.*)$", query)
    if schema:
        parts = [p.strip() for p in schema.group(1).split(",")]
        rest = schema.group(2)
        namespace, dims = parts[0], frozenset(parts[1:])
    else:
        ns = re.search(r'Namespace="([^"]+)"', query)
        assert ns, f"SEARCH without a namespace: {query!r}"
        namespace, dims, rest = ns.group(1), None, query.replace(ns.group(0), "")
    name = re.search(r'MetricName="([^"]+)"', rest)
    return namespace, (name.group(1) if name else None), dims


def dashboard_metrics(widgets: list[dict]) -> list[dict]:
    """Every metric reference: {widget, namespace, name, dims, values} (values: dim name -> value)."""
    refs = []
    for widget in widgets:
        if widget["type"] != "metric":
            continue
        title = widget["properties"]["title"]
        for row in widget["properties"]["metrics"]:
            if isinstance(row[0], dict) and "expression" in row[0]:
                found = SEARCH.findall(row[0]["expression"])
                assert found, f"{title}: an expression without SEARCH: {row[0]['expression']}"
                for query in found:
                    namespace, name, dims = parse_search(query.replace('\\"', '"'))
                    refs.append({"widget": title, "namespace": namespace, "name": name, "dims": dims, "values": {}})
                continue
            fields = [f for f in row if not isinstance(f, dict)]
            assert "..." not in fields and len(fields) >= 2 and len(fields) % 2 == 0, f"{title}: {row}"
            values = dict(zip(fields[2::2], fields[3::2]))
            refs.append({"widget": title, "namespace": fields[0], "name": fields[1], "dims": frozenset(values),
                         "values": values})
    return refs


def host_namespaces() -> set[str]:
    """Namespaces the launch template hands to the host's neuron-monitor CloudWatch publisher."""
    user_data = props(load_template()["Resources"]["LaunchTemplate"])["LaunchTemplateData"]["UserData"]
    text = user_data["Fn::Base64"]["Fn::Sub"]
    found = set(re.findall(r"neuron-monitor-cloudwatch\.py.*--namespace (\S+)", text))
    found |= set(re.findall(r"\$pub --namespace (\S+)", text))
    return {n.replace("${MetricsNamespace}", NS) for n in found}


def problems(refs: list[dict], variables: dict) -> list[str]:
    """Why each reference is not something that is emitted (empty = all good)."""
    ours = stack_namespace_metrics()
    hosts = host_namespaces()
    out = []
    for ref in refs:
        where = f"{ref['widget']}: {ref['namespace']} {ref['name']}"
        if ref["namespace"] == NS:
            if ref["name"] is None or (ref["name"], ref["dims"]) not in ours:
                out.append(f"{where} {sorted(ref['dims'] or [])}: not emitted by the job, submitter or publisher")
            elif ref["values"].get("Service", "whisper-batch") != "whisper-batch":
                out.append(f"{where}: Service={ref['values']['Service']} is not the stack's service")
        elif ref["namespace"] in hosts:
            if ref["name"] is not None:
                out.append(f"{where}: host Neuron metrics are searched by a word, their names are not ours to name")
        elif ref["namespace"] in AWS_METRICS:
            names, dim = AWS_METRICS[ref["namespace"]]
            if ref["name"] not in names or ref["dims"] != {dim}:
                out.append(f"{where} {sorted(ref['dims'] or [])}: not a metric AWS publishes")
                continue
            value = ref["values"][dim]
            var = re.fullmatch(r"\$\{(\w+)\}", value)
            if not var or variables.get(var.group(1)) not in AWS_DIMENSION_SOURCES[dim]:
                out.append(f"{where}: {dim}={value} is not one of this stack's resources")
        else:
            out.append(f"{where}: namespace emitted by nothing in this stack")
    return out


# ---------------------------------------------------------------------------- tests
def test_every_dashboard_metric_is_emitted():
    widgets, variables = dashboard()
    refs = dashboard_metrics(widgets)
    assert len(refs) >= 15
    assert problems(refs, variables) == []


def test_the_check_catches_what_nothing_emits():
    """A misspelt name, a wrong dimension set, an unknown namespace and a foreign queue all fail."""
    _, variables = dashboard()
    bad = [
        {"widget": "w", "namespace": NS, "name": "JobsFail", "dims": frozenset({"Service"}), "values": {}},
        {"widget": "w", "namespace": NS, "name": "JobsSucceeded", "dims": frozenset({"Service", "Reason"}), "values": {}},
        {"widget": "w", "namespace": "Other", "name": "JobsFailed", "dims": frozenset({"Service"}), "values": {}},
        {"widget": "w", "namespace": "AWS/SQS", "name": "ApproximateNumberOfMessagesVisible",
         "dims": frozenset({"QueueName"}), "values": {"QueueName": "someone-elses-queue"}},
        {"widget": "w", "namespace": HOST_NS, "name": "neuroncore_utilization", "dims": None, "values": {}},
    ]
    assert len(problems(bad, variables)) == len(bad)
    good = [{"widget": "w", "namespace": NS, "name": "JobsFailed", "dims": frozenset({"Service", "Reason"}), "values": {}}]
    assert problems(good, variables) == []


def test_emitted_sets_come_from_the_code():
    job = {name for name, _ in job_emitted()}
    assert {"JobsSucceeded", "JobsFailed", "AudioSeconds", "RealTimeFactor", "ModelLoadSeconds",
            "NeuronCoreUtilization", "NeuronCoreUtilizationPeak", "PackObjects"} <= job
    assert ("JobsFailed", frozenset({"Service", "Reason"})) in job_emitted()
    assert ("ObjectsSkipped", frozenset({"Service", "Reason"})) in submitter_emitted()
    assert {name for name, _ in submitter_emitted()} >= {"JobsSubmitted", "ObjectsSubmitted", "SubmitFailures"}
    assert host_namespaces() == {HOST_NS}


@pytest.mark.parametrize("namespace, name", [
    (NS, "JobsSucceeded"), (NS, "JobsFailed"), (NS, "ObjectsSubmitted"), (NS, "AudioSeconds"),
    (NS, "RealTimeFactor"), (NS, "ModelLoadSeconds"), (NS, "NeuronCoreUtilization"),
    (NS, queue_metrics.RUNNABLE_METRIC), ("AWS/SQS", "ApproximateNumberOfMessagesVisible"),
    ("AWS/SQS", "ApproximateAgeOfOldestMessage"), (HOST_NS, None),
])
def test_dashboard_shows_what_issue_22_asks_for(namespace, name):
    """Done per hour, audio hours, RTF, queue depth (Batch RUNNABLE and SQS), DLQ, NeuronCore
    utilization and memory, model load."""
    refs = dashboard_metrics(dashboard()[0])
    assert any(r["namespace"] == namespace and r["name"] == name for r in refs), (namespace, name)


def test_queue_and_dlq_depth_are_both_shown():
    widgets, variables = dashboard()
    queues = {variables[r["values"]["QueueName"][2:-1]]["Fn::GetAtt"][0] for r in dashboard_metrics(widgets)
              if r["name"] == "ApproximateNumberOfMessagesVisible"}
    assert queues == {"EventQueue", "EventDeadLetterQueue"}


def test_memory_widget_searches_the_host_namespace_for_memory():
    refs = [r for r in dashboard_metrics(dashboard()[0]) if r["namespace"] == HOST_NS]
    assert refs and all("memory" in r["widget"].lower() for r in refs)


def test_alarm_widget_lists_the_stacks_alarms():
    widgets, variables = dashboard()
    resources = load_template()["Resources"]
    alarm_widgets = [w for w in widgets if w["type"] == "alarm"]
    assert len(alarm_widgets) == 1
    for arn in alarm_widgets[0]["properties"]["alarms"]:
        source = variables[re.fullmatch(r"\$\{(\w+)\}", arn).group(1)]
        assert resources[source["Fn::GetAtt"][0]]["Type"] == "AWS::CloudWatch::Alarm"


def test_widgets_fit_the_grid_without_overlap():
    cells = set()
    for w in dashboard()[0]:
        assert 0 <= w["x"] and w["x"] + w["width"] <= 24, w
        box = {(x, y) for x in range(w["x"], w["x"] + w["width"]) for y in range(w["y"], w["y"] + w["height"])}
        assert not cells & box, f"overlap at {w['properties'].get('title')}"
        cells |= box
