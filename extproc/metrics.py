"""Prometheus metrics of the service (prometheus-client). Names follow Prometheus conventions."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

DECISIONS = Counter("prefix_router_decisions", "Routing decisions by reason", ["reason"])
BAD_INPUT = Counter("prefix_router_bad_input", "Requests whose body gave no routing text, by reason", ["reason"])
STREAM_ERRORS = Counter("prefix_router_stream_errors", "ext_proc streams that ended in error, by kind", ["kind"])
NO_UPSTREAM = Counter("prefix_router_no_healthy_upstream", "Requests answered 503 because no upstream was healthy")
DECISION_SECONDS = Histogram(
    "prefix_router_decision_seconds",
    "Time to parse the body and decide, per request",
    buckets=(0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1),
)
MATCH_RATE = Histogram(
    "prefix_router_match_rate", "Matched characters / routing-text characters per decision",
    buckets=(0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0),
)
INFLIGHT = Gauge("prefix_router_inflight_requests", "In-flight requests per upstream", ["upstream"])
TREE_CHARS = Gauge("prefix_router_tree_characters", "Characters held in the tree per upstream", ["upstream"])
EVICTED_CHARS = Counter("prefix_router_evicted_characters", "Characters evicted from the tree")
EXPIRED_TICKETS = Counter(
    "prefix_router_inflight_expired", "In-flight entries released by timeout because no finish report came"
)
