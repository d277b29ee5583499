"""contrib/grafana and contrib/prometheus: every query names metrics cortex exports.

The names are collected from the registries the apps build (GatewayMetrics,
NeuronMetrics), not written down here: renaming a metric without the
dashboard and the alerts fails this test.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric

from cortex.gateway.metrics import GatewayMetrics
from cortex.neuron.metrics import NeuronMetrics

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "contrib" / "grafana" / "cortex.json"
ALERTS = ROOT / "contrib" / "prometheus" / "cortex-alerts.yml"

#: The series each metric type exposes, by suffix of its family name.
SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
    "gauge": ("",),
    "info": ("_info",),
    "unknown": ("",),
}
NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")


def series(family: Metric) -> set[str]:
    return {family.name + suffix for suffix in SUFFIXES[family.type]}


def families(registry: CollectorRegistry) -> dict[str, set[str]]:
    """Family name -> the series names it exports."""
    return {family.name: series(family) for family in registry.collect()}


@pytest.fixture(scope="module")
def gateway_metrics() -> GatewayMetrics:
    return GatewayMetrics.create()


@pytest.fixture(scope="module")
def exported(gateway_metrics: GatewayMetrics) -> dict[str, set[str]]:
    neuron = NeuronMetrics(list, list)
    return {**families(gateway_metrics.registry), **families(neuron.registry)}


def metric_names(expr: str) -> set[str]:
    """The cortex series a PromQL expression reads (label values and strings aside)."""
    without_strings = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    return {name for name in NAME.findall(without_strings) if name.startswith("cortex_")}


def balanced(expr: str) -> bool:
    pairs, stack = {")": "(", "]": "[", "}": "{"}, []
    for char in re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr):
        if char in "([{":
            stack.append(char)
        elif char in pairs and (not stack or stack.pop() != pairs[char]):
            return False
    return not stack


def dashboard_panels() -> list[dict[str, Any]]:
    document = json.loads(DASHBOARD.read_text())
    return [p for p in document["panels"] if p["type"] != "row"]


def test_every_panel_query_names_exported_metrics(exported: dict[str, set[str]]) -> None:
    known = set().union(*exported.values())
    panels = dashboard_panels()
    assert panels
    for panel in panels:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            expr = target["expr"]
            names = metric_names(expr)
            assert names, f"{panel['title']}: {expr!r} reads no cortex metric"
            assert names <= known, f"{panel['title']}: not exported: {sorted(names - known)}"
            assert balanced(expr), f"{panel['title']}: unbalanced {expr!r}"


def test_the_dashboard_covers_what_operators_watch(
    exported: dict[str, set[str]], gateway_metrics: GatewayMetrics
) -> None:
    charted = set().union(
        *(metric_names(t["expr"]) for p in dashboard_panels() for t in p["targets"])
    )
    m = gateway_metrics
    wanted = [
        m.requests,
        m.errors,
        m.first_token,
        m.tokens_per_second,
        m.gateway_queue,
        m.queue_depth,
        m.cold_starts,
        m.evictions,
        m.thrash,
        m.neuron_up,
    ]
    names = [metric.describe()[0].name for metric in wanted]
    neuron = NeuronMetrics(list, list)
    names += [neuron.tokens.describe()[0].name]
    names += [name for name in families(neuron.registry) if "device_memory" in name]
    for name in names:
        assert exported[name] & charted, f"no panel charts {name}"


def test_dashboard_layout() -> None:
    document = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in document["panels"]]
    assert len(ids) == len(set(ids))
    assert document["uid"] and document["title"]
    variables = {v["name"]: v for v in document["templating"]["list"]}
    assert variables["datasource"]["query"] == "prometheus"
    for panel in document["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
            assert panel.get("description"), panel["title"]


def alert_rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(ALERTS.read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def test_every_alert_expr_names_exported_metrics(exported: dict[str, set[str]]) -> None:
    known = set().union(*exported.values())
    for rule in alert_rules():
        names = metric_names(rule["expr"])
        assert names, f"{rule['alert']}: reads no cortex metric"
        assert names <= known, f"{rule['alert']}: not exported: {sorted(names - known)}"
        assert balanced(rule["expr"]), rule["alert"]
        assert rule["labels"]["severity"] in ("warning", "critical")
        assert rule["annotations"]["summary"]
        assert re.fullmatch(r"\d+[smh]", rule["for"])


def test_alerts_for_a_neuron_down_thrash_and_errors(
    exported: dict[str, set[str]], gateway_metrics: GatewayMetrics
) -> None:
    watched = set().union(*(metric_names(rule["expr"]) for rule in alert_rules()))
    m = gateway_metrics
    for metric in (m.neuron_up, m.thrash, m.errors, m.requests):
        name = metric.describe()[0].name
        assert exported[name] & watched, f"no alert reads {name}"
