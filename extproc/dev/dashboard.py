"""The Grafana dashboard of prefix-router, built with grafana-foundation-sdk (never hand-written JSON).

    python -m extproc.dev.dashboard > deploy/grafana/prefix-router.json     (make dashboard)

Panels over Prometheus: decisions by reason and the share decided on a prefix match, decision
latency, in-flight per upstream, upstream health and ejections, tree size and evictions, bad input
and stream errors, the replicas' sync, and Envoy's own ext_proc and cluster stats beside them.
``tests/test_dashboard.py`` parses every query with promql-parser and checks that each metric it
names is one the service or Envoy exports; a test fails when the committed JSON is stale.
"""

from __future__ import annotations

import json
import sys

from grafana_foundation_sdk.builders import dashboard, prometheus, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.dashboard import DataSourceRef

DATASOURCE = DataSourceRef(type_val="prometheus", uid="${datasource}")
RATE = "$__rate_interval"

# (title, unit, description, [(query, legend)]): rows of panels, two to a row
PANELS: list[tuple[str, list[tuple[str, str, str, list[tuple[str, str]]]]]] = [
    ("Decisions", [
        ("Decisions by reason", "reqps", "cache_hit, cache_miss, imbalance, no_routing_text, fallback (a decision that raised)",
         [(f"sum by (reason) (rate(prefix_router_decisions_total[{RATE}]))", "{{reason}}")]),
        ("Decided on a prefix match", "percentunit", "cache_hit decisions / all decisions with a routing text (the tree's prediction)",
         [(f'sum(rate(prefix_router_decisions_total{{reason="cache_hit"}}[{RATE}])) / '
           f'sum(rate(prefix_router_decisions_total{{reason=~"cache_hit|cache_miss|imbalance"}}[{RATE}]))', "predicted hit share")]),
        ("Decision latency", "s", "parse + match + decide per request, p50 and p99",
         [(f"histogram_quantile(0.5, sum by (le) (rate(prefix_router_decision_seconds_bucket[{RATE}])))", "p50"),
          (f"histogram_quantile(0.99, sum by (le) (rate(prefix_router_decision_seconds_bucket[{RATE}])))", "p99")]),
        ("Matched share of the prompt", "percentunit", "matched characters / routing-text characters, median",
         [(f"histogram_quantile(0.5, sum by (le) (rate(prefix_router_match_rate_bucket[{RATE}])))", "median match rate")]),
        ("New sessions over the routers' threshold", "percentunit",
         "requests not continuing a conversation whose match at their router passes 0.3 (sglang-router's --cache-threshold; "
         "edit to yours, a bucket bound): each router runs all of them on the one worker that first stored the shared prefix "
         "(README, The sglang-routers behind it: it matters when sessions go on for many turns); the median match rate of "
         "new sessions beside it",
         [(f'1 - sum(rate(prefix_router_new_session_match_rate_bucket{{le="0.3"}}[{RATE}])) / '
           f"sum(rate(prefix_router_new_session_match_rate_count[{RATE}]))", "share over 0.3"),
          (f"histogram_quantile(0.5, sum by (le) (rate(prefix_router_new_session_match_rate_bucket[{RATE}])))", "median new-session match rate")]),
        ("Conversations kept home", "percentunit",
         "requests continuing an earlier conversation that went to an upstream holding it (--continuation-knee, --continuation-tail)",
         [(f'sum(rate(prefix_router_continuations_total{{where="home"}}[{RATE}])) / '
           f"sum(rate(prefix_router_continuations_total[{RATE}]))", "home share")]),
        ("Sessions moved off an evicting router", "reqps",
         "--move-evicted-sessions (on by default): sessions moved once after their router's worker evicted their history",
         [(f"sum(rate(prefix_router_session_moves_total[{RATE}]))", "moves")]),
        ("Observed hit ratio (sampled responses)", "percentunit",
         "cached / prompt tokens the workers reported, per upstream (--observe-sample); the tree's prediction error beside it",
         [(f"sum by (upstream) (rate(prefix_router_observed_cached_tokens_total[{RATE}])) / "
           f"sum by (upstream) (rate(prefix_router_observed_prompt_tokens_total[{RATE}]))", "{{upstream}}"),
          (f"histogram_quantile(0.5, sum by (le) (rate(prefix_router_prediction_error_bucket[{RATE}])))", "median prediction error")]),
    ]),
    ("Upstreams", [
        ("In flight per upstream", "short", "requests decided and not yet reported finished (this replica's and its peers')",
         [("max by (upstream) (prefix_router_inflight_requests)", "{{upstream}}")]),
        ("Healthy upstreams", "short", "upstreams taking traffic, per replica",
         [("sum by (instance) (prefix_router_upstream_healthy)", "{{instance}}")]),
        ("Ejections", "short", "passive ejections after failures on real traffic",
         [(f"sum by (upstream) (increase(prefix_router_upstream_ejections_total[{RATE}]))", "{{upstream}}")]),
        ("Active health-check failures", "short", "failed GETs of the health endpoint",
         [(f"sum by (upstream) (increase(prefix_router_health_check_failures_total[{RATE}]))", "{{upstream}}")]),
        ("Workers per upstream", "short", "healthy workers each router reports (--workers-endpoint; 0: not known), its knee's multiple; failed reads",
         [("max by (upstream) (prefix_router_upstream_workers)", "{{upstream}}"),
          (f"sum by (upstream, reason) (increase(prefix_router_workers_read_failures_total[{RATE}]))", "read failed {{upstream}} {{reason}}")]),
    ]),
    ("Tree", [
        ("Tree size per upstream", "short", "budget held (characters, 256 per node), against --max-tree-size",
         [("max by (upstream) (prefix_router_tree_characters)", "{{upstream}}")]),
        ("Evictions and refusals", "short", "characters evicted by the sweep; routing texts not learnt at the budget",
         [(f"sum(rate(prefix_router_evicted_characters_total[{RATE}]))", "evicted chars/s"),
          (f"sum(rate(prefix_router_tree_inserts_refused_total[{RATE}]))", "inserts refused/s")]),
        ("Budgets cut by observed hits", "short", "stale sampled reports that cut an upstream's share of the tree (--observe-feedback)",
         [(f"sum by (upstream) (increase(prefix_router_tree_shrinks_total[{RATE}]))", "{{upstream}}")]),
    ]),
    ("Errors", [
        ("Bad input", "reqps", "requests whose body gave no routing text, by reason (routed by load)",
         [(f"sum by (reason) (rate(prefix_router_bad_input_total[{RATE}]))", "{{reason}}")]),
        ("Stream errors and abandoned streams", "reqps", "ext_proc/access-log streams that failed; streams ended before their answer",
         [(f"sum by (code) (rate(prefix_router_stream_errors_total[{RATE}]))", "{{code}}"),
          (f"sum(rate(prefix_router_streams_abandoned_total[{RATE}]))", "abandoned"),
          (f"sum(rate(prefix_router_no_healthy_upstream_total[{RATE}]))", "503 no healthy upstream")]),
    ]),
    ("Replicas", [
        ("Sync link and peers", "short", "1 while connected to NATS; peers heard within the timeout; 1 while warming up",
         [("prefix_router_sync_connected", "connected {{instance}}"), ("prefix_router_sync_peers", "peers {{instance}}"),
          ("prefix_router_sync_warming", "warming {{instance}}")]),
        ("Divergence", "short", "peers' events missed, placements not shared, drops",
         [(f"sum(increase(prefix_router_sync_missed_events_total[{RATE}]))", "missed events"),
          (f"sum(increase(prefix_router_sync_unshared_placements_total[{RATE}]))", "unshared placements"),
          (f"sum by (reason) (increase(prefix_router_sync_dropped_total[{RATE}]))", "dropped {{reason}}")]),
        ("Sessions shared", "short", "notes on followed sessions received from peers: applied, or naming a session this book does not know",
         [(f'sum by (kind, result) (increase(prefix_router_sync_session_notes_total{{result!="sent"}}[{RATE}]))', "{{kind}} {{result}}")]),
    ]),
    ("Envoy", [
        ("Pinned and fallback requests", "reqps", "requests routed where prefix-router said, and by Envoy alone (service down or late)",
         [(f'sum by (envoy_cluster_name) (rate(envoy_cluster_upstream_rq_total{{envoy_cluster_name=~"sglang_routers_pinned|sglang_routers_fallback"}}[{RATE}]))',
           "{{envoy_cluster_name}}")]),
        ("ext_proc failures", "reqps", "Envoy's side: failed open, failed streams, message timeouts",
         [(f"sum(rate(envoy_http_ext_proc_failure_mode_allowed[{RATE}]))", "failed open"),
          (f"sum(rate(envoy_http_ext_proc_streams_failed[{RATE}]))", "streams failed"),
          (f"sum(rate(envoy_http_ext_proc_message_timeouts[{RATE}]))", "message timeouts")]),
        ("Router answers by class", "reqps", "responses of the pinned routers by status class",
         [(f'sum by (envoy_response_code_class) (rate(envoy_cluster_upstream_rq_xx{{envoy_cluster_name="sglang_routers_pinned"}}[{RATE}]))',
           "{{envoy_response_code_class}}xx")]),
        ("Healthy service replicas (Envoy's view)", "short", "prefix-router endpoints passing Envoy's gRPC health check",
         [('envoy_cluster_membership_healthy{envoy_cluster_name="prefix_router"}', "healthy replicas")]),
    ]),
]


def queries() -> list[str]:
    """Every PromQL expression on the dashboard (the test checks each)."""
    return [q for _, panels in PANELS for *_, targets in panels for q, _ in targets]


def build() -> dict:
    board = (
        dashboard.Dashboard("prefix-router").uid("prefix-router").tags(["prefix-router", "envoy", "sglang"])
        .refresh("30s").time("now-1h", "now").timezone("browser")
        .with_variable(dashboard.DatasourceVariable("datasource").label("Prometheus").type("prometheus"))
    )
    for row, panels in PANELS:
        board = board.with_row(dashboard.Row(row))
        for title, unit, description, targets in panels:
            panel = timeseries.Panel().title(title).unit(unit).description(description).datasource(DATASOURCE).height(8).span(12)
            for i, (expr, legend) in enumerate(targets):
                panel = panel.with_target(prometheus.Dataquery().expr(expr).legend_format(legend).ref_id(chr(ord("A") + i)))
            board = board.with_panel(panel)
    return json.loads(JSONEncoder(sort_keys=True, indent=2).encode(board.build()))


def render() -> str:
    return json.dumps(build(), indent=2, sort_keys=True) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render())
