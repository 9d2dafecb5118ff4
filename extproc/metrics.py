"""Prometheus metrics of the service (prometheus-client), named per Prometheus conventions.

Counters and histograms are updated on the request path (a label lookup and an add: ~1 µs).
Gauges of state (in-flight per upstream, tree size per upstream, upstream health) are read from the
director at scrape time by :class:`StateCollector`, so the request path never updates them.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

# The *_created series double the exposition for no use here.
disable_created_metrics()

DECISIONS = Counter("prefix_router_decisions", "Routing decisions by reason", ["reason"])
CONTINUATIONS = Counter(
    "prefix_router_continuations",
    "Decisions for requests continuing an earlier conversation (a next turn: a whole earlier prompt; or a turn editing its own "
    "history: --continuation-tail), by where they went: home (an upstream holding the deepest match) or moved "
    "(--continuation-knee keeps them home below that many in flight)",
    ["where"],
)
BAD_INPUT = Counter("prefix_router_bad_input", "Requests whose body gave no routing text, by reason", ["reason"])
STREAM_ERRORS = Counter("prefix_router_stream_errors", "ext_proc or access-log streams that failed (protocol violation or a fault here), by gRPC code", ["code"])
STREAMS_ABANDONED = Counter(
    "prefix_router_streams_abandoned",
    "ext_proc streams that ended before their answer went out (the client left mid-upload, or Envoy gave up and failed open)",
)
BODIES_NOT_HELD = Counter(
    "prefix_router_bodies_not_held",
    "Duplex requests decided by load alone because all streams together held --max-held-body-bytes",
)
UNKNOWN_TICKETS = Counter(
    "prefix_router_unknown_tickets", "Access-log entries whose ticket this service does not hold (ignored: they release and eject nothing)"
)
DECISION_ERRORS = Counter("prefix_router_decision_errors", "Decisions that raised and fell back to load balancing")
NO_UPSTREAM = Counter("prefix_router_no_healthy_upstream", "Requests answered 503 because no upstream was healthy")
DECISION_SECONDS = Histogram(
    "prefix_router_decision_seconds",
    "Time to parse the body and decide, per request",
    buckets=(0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1),
)
RATE_BUCKETS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)
MATCH_RATE = Histogram(
    "prefix_router_match_rate", "Matched characters / routing-text characters per decision with a routing text", buckets=RATE_BUCKETS,
)
NEW_SESSION_MATCH_RATE = Histogram(
    "prefix_router_new_session_match_rate",
    "Match rate at the chosen upstream of the prefix-matched decisions for requests that do not continue an earlier "
    "conversation: a new session above the routers' own --cache-threshold shares a prefix (a system prompt) that its "
    "router sends, with every such session, to the one worker that first stored it (README, Deploying)",
    buckets=RATE_BUCKETS,
)
EVICTED_CHARS = Counter("prefix_router_evicted_characters", "Budget evicted from the tree (characters, 256 per node)")
INSERTS_REFUSED = Counter(
    "prefix_router_tree_inserts_refused", "Routing texts not learnt because the chosen upstream held its whole --max-tree-size"
)
PARTITIONS_DROPPED = Counter("prefix_router_tree_partitions_dropped", "Partitions dropped, least recently used first, past --max-partitions")
EXPIRED_TICKETS = Counter(
    "prefix_router_inflight_expired", "In-flight entries released by timeout because no finish report came"
)
EJECTIONS = Counter("prefix_router_upstream_ejections", "Passive ejections after failures seen on real traffic", ["upstream"])
HEALTH_CHECK_FAILURES = Counter("prefix_router_health_check_failures", "Failed active health checks", ["upstream"])
WORKERS_READ_FAILURES = Counter(
    "prefix_router_workers_read_failures",
    "Reads of an upstream's worker list (--workers-endpoint) that gave no count, by reason (unreachable, status, "
    "too_large, bad_body): the upstream counts as one worker, or keeps its last count when unreachable",
    ["upstream", "reason"],
)
UPSTREAMS_REFUSED = Counter(
    "prefix_router_upstreams_refused", "Upstream addresses refused by the address policy (--allowed-upstream-cidrs), from any source"
)
ADMIN_DENIED = Counter("prefix_router_admin_denied", "Admin API calls refused for a missing or wrong token")
OBSERVED_PROMPT = Counter("prefix_router_observed_prompt_tokens", "Prompt tokens of the sampled responses (--observe-sample), by upstream", ["upstream"])
OBSERVED_CACHED = Counter(
    "prefix_router_observed_cached_tokens",
    "Prompt tokens the upstream's workers reported cached, of the sampled responses: observed hit ratio = this / prompt tokens",
    ["upstream"],
)
TREE_SHRINKS = Counter(
    "prefix_router_tree_shrinks", "Stale sampled reports (--observe-feedback): the upstream's workers held far less than the tree predicted, "
    "so its share of the tree was cut", ["upstream"],
)
SESSION_MOVES = Counter(
    "prefix_router_session_moves",
    "Sessions moved once off a router whose worker evicted their history (--move-evicted-sessions)",
)
OBSERVATIONS = Counter(
    "prefix_router_observations", "Sampled responses by result: read, no_usage (reported no cache), not_ok (an error status), cut (stream ended early), "
    "bad_header (an observing stream without the decision's headers)",
    ["result"],
)
PREDICTION_ERROR = Histogram(
    "prefix_router_prediction_error",
    "Sampled requests: the tree's predicted match share minus the observed cached share (positive: the tree promised more than the cache held)",
    buckets=(-0.75, -0.5, -0.25, -0.1, -0.02, 0.02, 0.1, 0.25, 0.5, 0.75, 1.0),
)
STATUS_DENIED = Counter(
    "prefix_router_status_denied",
    "Status page requests refused: the client outside --status-allowed-cidrs (peer) or a Host that is not an address or localhost (host)",
    ["reason"],
)
RELOADS = Counter("prefix_router_config_reloads", "Configuration reloads by result", ["result"])

# -- replicas sharing their view (--sync-url) -------------------------------------------------------
SYNC_MESSAGES = Counter("prefix_router_sync_messages", "Sync events sent and received", ["direction"])
SYNC_BYTES = Counter("prefix_router_sync_bytes", "Bytes of sync events sent and received", ["direction"])
SYNC_PLACEMENTS = Counter("prefix_router_sync_placements", "Placements shared with peers (sent) and applied from them (received)", ["direction"])
SYNC_SESSIONS = Counter(
    "prefix_router_sync_session_notes",
    "Notes on followed sessions (--move-evicted-sessions) sent to peers and received from them, by kind (moved, evicted, cached) "
    "and result (sent; applied; unknown: this replica's book does not keep the session under the prompt named, "
    "because it forgot it, never saw its turns, or already decided its next turn)",
    ["kind", "result"],
)
SYNC_REJECTED = Counter("prefix_router_sync_rejected", "Sync messages or items dropped as malformed or foreign, by reason", ["reason"])
SYNC_DROPPED = Counter(
    "prefix_router_sync_dropped",
    "What could not be shared: placements or finish reports past --sync-max-pending (outbox), messages that failed to publish "
    "(publish), events lost by a slow subscriber (slow_consumer)", ["reason"],
)
SYNC_MISSED = Counter("prefix_router_sync_missed_events", "Peers' events never received (gaps in their sequence numbers): the view diverged")
SYNC_UNSHARED = Counter("prefix_router_sync_unshared_placements", "Placements decided while the sync link was down (the view diverged)")
SYNC_PEERS_EXPIRED = Counter("prefix_router_sync_peers_expired", "Peers dropped (with their in-flight counts) after --sync-peer-timeout-secs of silence")
SYNC_SNAPSHOTS = Counter("prefix_router_sync_snapshots", "Snapshots served to peers and loaded from them, by result", ["role", "result"])
SYNC_CONNECTED = Gauge("prefix_router_sync_connected", "1 while the sync link to NATS is up (0 when down or not configured)")
SYNC_WARMING = Gauge(
    "prefix_router_sync_warming", "1 while a starting replica waits for a peer's snapshot (it routes meanwhile, on its own view)")
SYNC_PEERS = Gauge("prefix_router_sync_peers", "Peers heard from within --sync-peer-timeout-secs")
FORWARDED_FINISHES = Counter(
    "prefix_router_finishes_forwarded", "Access-log entries for another replica's ticket, sent on to it through the sync link"
)


class StateCollector(Collector):
    """Gauges read when Prometheus scrapes, from a snapshot function (the director's
    ``upstreams``): the request path never updates a gauge."""

    def __init__(self, snapshot: Callable[[], Iterable[Any]]) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterator[GaugeMetricFamily]:
        inflight = GaugeMetricFamily("prefix_router_inflight_requests", "In-flight requests per upstream", labels=["upstream"])
        healthy = GaugeMetricFamily("prefix_router_upstream_healthy", "1 if the upstream receives traffic, else 0", labels=["upstream"])
        chars = GaugeMetricFamily(
            "prefix_router_tree_characters", "Budget held in the tree per upstream (characters, 256 per node)", labels=["upstream"]
        )
        workers = GaugeMetricFamily(
            "prefix_router_upstream_workers",
            "Healthy workers the upstream's router last reported (--workers-endpoint); 0: not known (counted as one)",
            labels=["upstream"],
        )
        for u in self.snapshot():
            inflight.add_metric([u.address], u.inflight)
            healthy.add_metric([u.address], 1 if u.healthy else 0)
            chars.add_metric([u.address], u.tree_characters)
            workers.add_metric([u.address], u.workers)
        yield inflight
        yield healthy
        yield chars
        yield workers


def register_state(snapshot: Callable[[], Iterable[Any]]) -> StateCollector:
    """(Re)register the state collector; one per process."""
    global _state
    if _state is not None:
        REGISTRY.unregister(_state)
    _state = StateCollector(snapshot)
    REGISTRY.register(_state)
    return _state


_state: StateCollector | None = None
