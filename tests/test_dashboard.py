"""The Grafana dashboard and the alert rules: generated, parseable, and naming only real metrics."""

from __future__ import annotations

import json

import promql_parser
import pytest
import yaml
from prometheus_client import REGISTRY

from extproc import metrics
from extproc.dev import dashboard
from extproc.dev.stack import ROOT

DASHBOARD = ROOT / "deploy" / "grafana" / "prefix-router.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yaml"
# Envoy's own series the dashboard and rules read (checked against a real Envoy's /stats/prometheus
# in tests/integration/test_dashboard_metrics.py)
ENVOY = {"envoy_cluster_upstream_rq_total", "envoy_http_ext_proc_failure_mode_allowed", "envoy_http_ext_proc_streams_failed",
         "envoy_http_ext_proc_message_timeouts", "envoy_cluster_upstream_rq_xx", "envoy_cluster_membership_healthy"}


def alert_exprs() -> list[str]:
    rules = yaml.safe_load(ALERTS.read_text())["groups"][0]["rules"]
    return [r["expr"] for r in rules]


def metric_names(expr: str) -> set[str]:
    """Every metric a PromQL expression selects (raises on a parse error)."""
    names = set()
    stack = [promql_parser.parse(expr.replace("$__rate_interval", "5m"))]  # Grafana's variable, as it substitutes it
    while stack:
        node = stack.pop()
        if type(node).__name__ == "VectorSelector":
            names.add(node.name)
        for attr in ("lhs", "rhs", "expr", "args", "vector_selector", "param"):
            v = getattr(node, attr, None)
            if isinstance(v, (list, tuple)):
                stack.extend(v)
            elif v is not None:
                stack.append(v)
    return names


def service_series() -> set[str]:
    """Every series name the service exports (counters with _total, histograms with _bucket...)."""
    metrics.register_state(lambda: [])
    names = set()
    for fam in REGISTRY.collect():
        names.add(fam.name)
        names.update(s.name for s in fam.samples)
        if fam.type == "counter":
            names.add(fam.name + "_total")
        if fam.type == "histogram":
            names.update(fam.name + suffix for suffix in ("_bucket", "_sum", "_count"))
    names.update({"prefix_router_inflight_requests", "prefix_router_upstream_healthy", "prefix_router_tree_characters"})  # state gauges
    return names


def test_the_committed_dashboard_is_the_generated_one():
    assert DASHBOARD.read_text() == dashboard.render(), "run make dashboard"


def test_the_dashboard_has_every_panel_the_operators_look_for():
    panels = [p["title"] for p in json.loads(DASHBOARD.read_text())["panels"] if p["type"] == "timeseries"]
    for wanted in ("Decisions by reason", "Decision latency", "In flight per upstream", "Tree size per upstream", "Ejections",
                   "Bad input", "Stream errors and abandoned streams", "ext_proc failures", "Sync link and peers"):
        assert wanted in panels


@pytest.mark.parametrize("expr", dashboard.queries() + alert_exprs())
def test_every_query_parses_and_names_only_exported_metrics(expr):
    names = metric_names(expr)
    assert names, expr
    unknown = names - service_series() - ENVOY
    assert not unknown, f"{expr}: {unknown}"


def test_a_misspelt_metric_is_caught():
    assert metric_names('rate(prefix_router_decisons_total[5m])') - service_series() == {"prefix_router_decisons_total"}
    with pytest.raises(Exception):
        metric_names("sum(rate(prefix_router_decisions_total[5m])")  # unbalanced


def test_every_alert_has_a_runbook_and_a_severity():
    rules = yaml.safe_load(ALERTS.read_text())["groups"][0]["rules"]
    assert {r["alert"] for r in rules} >= {"PrefixRouterNoHealthyUpstream", "PrefixRouterFailingOpen", "PrefixRouterHitShareCollapsed",
                                           "PrefixRouterUpstreamEjectedRepeatedly", "PrefixRouterTreeAtBudget", "PrefixRouterSyncDown"}
    for r in rules:
        assert r["annotations"]["runbook"] and r["labels"]["severity"] in ("page", "ticket"), r["alert"]
