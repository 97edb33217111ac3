"""neuron-monitor: report parser against a recorded report, sampler against a fake executable."""

from __future__ import annotations

import copy
import json
import os
import stat
import sys
import textwrap
import time
from pathlib import Path

import pytest

from batch_job.neuron_monitor import NeuronMonitorSampler, core_utilization, monitor_config, parse_visible_cores

REPORT = json.loads((Path(__file__).parent / "data" / "neuron_monitor_report.json").read_text())


def test_recorded_report_our_runtime_by_pid():
    assert core_utilization(REPORT, pid=4242) == pytest.approx(71.64)
    assert core_utilization(REPORT, pid=5151) == pytest.approx(12.5)  # lowest core of that runtime


def test_recorded_report_visible_cores():
    assert core_utilization(REPORT, pid=4242, visible_cores={2}) == pytest.approx(71.64)
    assert core_utilization(REPORT, pid=4242, visible_cores={1}) == pytest.approx(33.25)
    assert core_utilization(REPORT, pid=None, visible_cores={0, 1}) == pytest.approx((12.5 + 33.25) / 2)
    assert core_utilization(REPORT, pid=4242, visible_cores={7}) is None


def test_recorded_report_not_our_process():
    assert core_utilization(REPORT, pid=999) is None


def test_report_without_pids_uses_first_runtime():
    report = copy.deepcopy(REPORT)
    for runtime in report["neuron_runtime_data"]:
        del runtime["pid"]
    assert core_utilization(report, pid=os.getpid()) == pytest.approx(71.64)


def test_runtime_with_error_or_missing_groups_is_skipped():
    report = copy.deepcopy(REPORT)
    report["neuron_runtime_data"][0] = {"pid": 4242, "error": "runtime not responding", "report": {}}
    assert core_utilization(report, pid=4242) is None
    assert core_utilization({"system_data": {}}, pid=1) is None
    assert core_utilization({"neuron_runtime_data": [{"pid": 1, "report": {"neuroncore_counters": {
        "neuroncores_in_use": {"0": {"neuroncore_utilization": None}, "x": {}}}}}]}, pid=1) is None


@pytest.mark.parametrize("value,expected", [
    ("2", {2}), ("0-3", {0, 1, 2, 3}), ("0, 2-3", {0, 2, 3}), ("", None), (None, None), ("a-b", None)])
def test_parse_visible_cores(value, expected):
    assert parse_visible_cores(value) == (frozenset(expected) if expected is not None else None)


def test_config_asks_for_neuroncore_counters_only():
    config = monitor_config(0.5)
    assert config["period"] == "0.5s"
    assert config["neuron_runtimes"][0]["metrics"] == [{"type": "neuroncore_counters"}]


FAKE = textwrap.dedent("""\
    #!{python}
    import json, os, sys, time
    assert sys.argv[1] == "-c" and json.load(open(sys.argv[2]))["neuron_runtimes"]
    report = json.load(open({report!r}))
    report["neuron_runtime_data"][0]["pid"] = os.getppid()   # the job's process is our parent
    values = [10.0, 50.0, 90.0, 30.0]
    i = 0
    while True:
        report["neuron_runtime_data"][0]["report"]["neuroncore_counters"]["neuroncores_in_use"] = {{
            "2": {{"neuroncore_utilization": values[i % len(values)]}}}}
        print(json.dumps(report), flush=True)
        if i == 0:
            print("not json: a warning line", flush=True)
        i += 1
        time.sleep(0.02)
    """)


@pytest.fixture
def fake_monitor(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    exe = bin_dir / "neuron-monitor"
    exe.write_text(FAKE.format(python=sys.executable,
                               report=str(Path(__file__).parent / "data" / "neuron_monitor_report.json")))
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    return bin_dir


def test_sampler_against_fake_executable(fake_monitor):
    env = {"PATH": str(fake_monitor)}
    sampler = NeuronMonitorSampler("neuron-monitor", period_seconds=0.1, environ=env)
    assert sampler.available
    with sampler:
        deadline = time.monotonic() + 20
        while (sampler.result() is None or sampler.result().samples < 4) and time.monotonic() < deadline:
            time.sleep(0.05)
        proc = sampler._proc
    result = sampler.result()
    assert result is not None and result.samples >= 4
    assert result.peak == 90.0
    assert 10.0 <= result.avg <= 90.0
    assert proc.poll() is not None  # stopped cleanly: the monitor process is gone
    assert sampler._thread is not None and not sampler._thread.is_alive()
    assert set(result.as_figures()) == {"neuroncore_utilization_avg", "neuroncore_utilization_peak",
                                        "neuroncore_utilization_samples"}


def test_sampler_visible_cores_env_selects_core(fake_monitor):
    # core 1 belongs to another runtime in the recorded report (33.25 %)
    sampler = NeuronMonitorSampler("neuron-monitor", period_seconds=0.1,
                                   environ={"PATH": str(fake_monitor), "NEURON_RT_VISIBLE_CORES": "1"})
    with sampler:
        deadline = time.monotonic() + 20
        while sampler.result() is None and time.monotonic() < deadline:
            time.sleep(0.05)
    assert sampler.result().peak == pytest.approx(33.25)


def test_sampler_absent_is_a_no_op(tmp_path):
    sampler = NeuronMonitorSampler("neuron-monitor", environ={"PATH": str(tmp_path)})
    assert not sampler.available
    with sampler:
        pass
    assert sampler.result() is None
