"""The request lifecycle, free of gRPC: a request begins, is routed, and later finishes.

Everything outside the decision talks to the service through this class, by name: the ext_proc
handlers (:meth:`begin`, :meth:`route`, :meth:`abandoned`), the access-log receiver
(:meth:`finished`), discovery (:meth:`set_upstreams`), the active health checker
(:meth:`record_check`), the admin API, admin page and metrics (:meth:`upstreams`,
:meth:`tree_stats`, :meth:`explain`) and the server's housekeeping (:meth:`evict_slices`,
:meth:`expire`). Nobody else reaches into the pool or the tree.

The director asks the payload parser for the routing text, the policy for the upstream, and the
pool for a ticket. Nothing in here raises into the stream: a failure in parsing or deciding still
yields a healthy upstream (the least loaded), counted and logged.
"""

from __future__ import annotations

import enum
import random
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator

from . import logs, metrics
from .config import Config
from .feedback import FeedbackRule, is_stale, next_share, observed_chars
from .payload import RoutingInput, routing_input
from .newprefixes import NewPrefixes
from .policy import NEW_SESSIONS, Decision, continues, costs, decide, knee, least_loaded, session_kind
from .pool import Pool
from .replicas import Outbox, Peers, Seen, new_epoch, new_replica_id
from .sessions import Ref, Session, SessionBook, apply_note, decide_following, learn_placement, moved_if_due, reference, report
from .syncwire import MAX_REQUEST_ID, REPLICA_ID, Event, SessionNote, SnapshotRecord
from .tree import RadixTree

log = logs.get("prefix_router.director")

# The header that carries a request's ticket to its upstream and back in Envoy's access log.
TICKET_HEADER = "x-prefix-router-ticket"
# set on a sampled duplex request (--observe-sample): the tree's prediction, "matched/length"
OBSERVE_HEADER = "x-prefix-router-observe"
# requests whose response another stream will read, kept for that report (--move-evicted-sessions)
MAX_AWAITING_REPORTS = 16384

# A sweep trims an upstream to this share of its budget: room for 10% more before the next one.
SWEEP_TO = 0.9

# Parse failures that are not bad input: a request with no body or to an API without a prompt.
_NOT_BAD_INPUT = (None, "no_routing_endpoint", "empty_body")


class Outcome(enum.Enum):
    """How a finished request went for its router (from Envoy's access log)."""

    OK = "ok"
    FAILED = "failed"  # the router's doing: it broke or reset the stream, timed out, answered 502/503/504
    REFUSED = "refused"  # the connection was refused: nothing listens there, the router is down


@dataclass(slots=True)
class RequestInfo:
    """What the director keeps of one request between its headers and its finish."""

    path: str = ""
    content_encoding: str | None = None
    request_id: str = ""
    ticket: str = ""  # set by :meth:`Director.route` once an upstream holds the request
    # what the decision predicted, kept for a sampled response (--observe-sample)
    upstream: str = ""
    matched: int = 0
    text_len: int = 0
    # the session its report goes to, and at which of its turns (--move-evicted-sessions)
    session: Session | None = None
    session_turn: int = 0
    session_ref: Ref | None = None  # how peers name the session (--sync-url)
    for_book: bool = False  # its response is worth reading for the session's book (SessionBook.worth_reading)
    # its response is read as one of the --observe-sample share (not only for the session's book)
    sampled: bool = False


@dataclass(frozen=True, slots=True)
class UpstreamView:
    """One upstream as the admin API, the metrics and the status page show it."""

    address: str
    healthy: bool
    active_ok: bool
    ejected: bool
    inflight: int
    tree_characters: int
    ejected_secs_left: float = 0.0  # until the ejection's back-off ends (then a good check brings it back)
    check_failures: int = 0  # active checks failed in a row
    workers: int = 0  # healthy workers its router last reported (--workers-endpoint); 0: not known


@dataclass(frozen=True, slots=True)
class TreeStats:
    stored_characters: int
    nodes: int
    characters_per_upstream: dict[str, int]
    max_tree_size: int
    observed_hit_ratio_per_upstream: dict[str, float] = field(default_factory=dict)
    # upstreams whose share of the tree observed hits have cut below max_tree_size (--observe-feedback)
    learnt_budget_per_upstream: dict[str, int] = field(default_factory=dict)


class Director:
    def __init__(self, cfg: Config, seed: int | None = None) -> None:
        self.cfg = cfg
        self.policy = cfg.policy()
        self.replica_id = new_replica_id()
        self.epoch = new_epoch()
        self.pool = Pool(cfg.inflight_timeout_secs, cfg.lost_report_grace_secs, ticket_prefix=self.replica_id)
        # Other replicas' counts (their sum feeds the pool's loads), and what to tell them: the
        # outbox exists only when a sync link is configured (:meth:`share`).
        self.peers = Peers(cfg.sync_peer_timeout_secs)
        self.pool.peer_counts = self.peers.totals
        self.outbox: Outbox | None = None
        self.tree = RadixTree(cfg.max_partitions)
        self.rng = random.Random(seed)
        self.held_body_bytes = 0  # what duplex streams hold while their bodies arrive (handlers)
        # Running totals of decisions per (upstream, reason, session kind), for the status page's
        # recent windows (one dict increment per decision; the page samples it, see extproc.status).
        self.decided: dict[tuple[str, str, str], int] = {}
        # Sampled responses per upstream: [prompt tokens, cached tokens, responses] (--observe-sample)
        self.observed_totals: dict[str, list[int]] = {}
        # What an upstream may keep in the tree, learnt from stale reports (--observe-feedback);
        # absent: the configured budget.
        self.shares: dict[str, float] = {}
        self.feedback_rule = FeedbackRule()
        # Sessions followed turn to turn (--move-evicted-sessions); None: off
        self.book: SessionBook | None = None
        # request id -> (session, turn, sampled) of a request whose response another stream will
        # read (duplex mode's observing filter): where that report goes, and whether it is one of
        # the --observe-sample share. Bounded, oldest dropped.
        self.awaiting_reports: OrderedDict[str, tuple[Session, int, bool, Ref | None]] = OrderedDict()
        self._configure_book(cfg)
        # The new prefixes each upstream took lately, its own decisions' and its peers' (--new-prefix-window)
        self.new_prefixes = NewPrefixes(cfg.new_prefix_window)
        # Called when an upstream reaches its budget: the server wakes its eviction sweep at once
        # instead of at the next interval.
        self.wake_sweeper: Callable[[], None] = lambda: None

    def reconfigure(self, cfg: Config) -> None:
        self.cfg = cfg
        self.policy = cfg.policy()
        self.pool.tickets.timeout = cfg.inflight_timeout_secs
        self.pool.tickets.grace = cfg.lost_report_grace_secs
        self.tree.max_partitions = cfg.max_partitions
        self.peers.timeout = cfg.sync_peer_timeout_secs
        if not cfg.observe_feedback:
            self.shares.clear()
        self._configure_book(cfg)
        if cfg.new_prefix_window != self.new_prefixes.window:
            self.new_prefixes = NewPrefixes(cfg.new_prefix_window)

    def _configure_book(self, cfg: Config) -> None:
        """Start or stop following sessions; a reload keeps the sessions followed so far."""
        if not cfg.move_evicted_sessions:
            self.book = None
            self.awaiting_reports.clear()
        elif self.book is None:
            self.book = SessionBook(cfg.cache_threshold, cfg.move_family_turns)
        else:
            self.book.threshold, self.book.family_turns = cfg.cache_threshold, cfg.move_family_turns
        # In buffered mode the choice to read a response comes before the decision, so only
        # --observe-sample reads there: said once, on the first such stream (``observe_now``).
        self.warned_buffered = False

    # -- what the handlers need to know, read per request so that a reload takes effect ----------

    @property
    def header_name(self) -> str:
        return self.cfg.header_name

    @property
    def max_body_bytes(self) -> int:
        return self.cfg.max_body_bytes

    def hold(self, n: int) -> bool:
        """A duplex stream holds ``n`` more body bytes; False when every stream together would
        pass ``max_held_body_bytes`` (the caller then decides by load and lets the body through)."""
        if self.held_body_bytes + n > self.cfg.max_held_body_bytes:
            return False
        self.held_body_bytes += n
        return True

    def let_go(self, n: int) -> None:
        self.held_body_bytes -= n

    # -- a request's life ------------------------------------------------------------------------

    def begin(self, headers: dict[str, str]) -> RequestInfo:
        return RequestInfo(
            path=headers.get(":path", ""),
            content_encoding=headers.get("content-encoding"),
            request_id=headers.get("x-request-id", ""),
        )

    def route(self, info: RequestInfo, body: bytes | None, *, body_too_large: bool = False) -> str | None:
        """Decide for one request and hold it in flight on the chosen upstream; returns the
        upstream's address, or ``None`` when no upstream is healthy (the caller answers 503)."""
        started = time.perf_counter()
        loads = self.pool.loads()
        if not loads:
            metrics.NO_UPSTREAM.inc()
            log.warning("no_healthy_upstream", request_id=info.request_id)
            return None
        try:
            decision = self._decide(info, body, loads, body_too_large)
        except Exception:  # a bug must not cost the request: fall back to load balancing
            metrics.DECISION_ERRORS.inc()
            log.exception("decision_failed", request_id=info.request_id)
            decision = Decision(least_loaded(loads, self.policy.tie_break, self.rng), "fallback")
        info.ticket = self.pool.tickets.issue(decision.upstream, time.monotonic())
        if self.outbox is not None:
            self.outbox.changed()
        elapsed = time.perf_counter() - started
        metrics.DECISIONS.labels(decision.reason).inc()
        if decision.continuation:
            metrics.CONTINUATIONS.labels(decision.continuation).inc()
        info.upstream, info.matched, info.text_len = decision.upstream, decision.matched, decision.text_len
        kind = session_kind(decision, self.policy.cache_threshold)
        key = (decision.upstream, decision.reason, kind)
        self.decided[key] = self.decided.get(key, 0) + 1
        metrics.DECISION_SECONDS.observe(elapsed)
        if decision.text_len:
            rate = decision.matched / decision.text_len
            metrics.MATCH_RATE.observe(rate)
            if kind in NEW_SESSIONS:  # the rate policy.new_session_rate gives
                metrics.NEW_SESSION_MATCH_RATE.observe(rate)
        log.debug(
            "decision",
            request_id=info.request_id,
            upstream=decision.upstream,
            reason=decision.reason,
            matched=decision.matched,
            text_len=decision.text_len,
            decision_us=round(elapsed * 1e6, 1),
        )
        return decision.upstream

    def observed_hits(self) -> dict[str, tuple[float, int]]:
        """Per upstream with sampled responses: (observed hit ratio, responses) (--observe-sample)."""
        return {a: (cached / prompt, n) for a, (prompt, cached, n) in self.observed_totals.items() if prompt}

    def observe_now(self, info: RequestInfo | None = None) -> bool:
        """Whether to read this request's response for the cache hit its worker reports: a
        ``--observe-sample`` share of requests (``info.sampled``), and, when the decision is known
        (``info``: duplex mode), the turns whose report ``--move-evicted-sessions`` may move a
        session on."""
        sample = self.cfg.observe_sample
        if sample > 0 and self.rng.random() < sample:
            if info is not None:
                info.sampled = True
            return True
        if info is None:
            if self.book is not None and sample < 1.0 and not self.warned_buffered:
                self.warned_buffered = True
                # info, not a warning: the default follows sessions, and buffered mode is a supported
                # choice; a session there moves only on a sampled report
                log.info("move_evicted_sessions_buffered_reads_sample_only", observe_sample=sample)
            return False
        return self.book is not None and info.for_book

    def observing(self, info: RequestInfo) -> None:
        """The request's response will be read on another stream (duplex mode), which knows the
        request by its id only: keep the session its report must reach, and whether it was sampled."""
        if info.session is None or not info.request_id:
            return
        self.awaiting_reports[info.request_id] = (info.session, info.session_turn, info.sampled, info.session_ref)
        if len(self.awaiting_reports) > MAX_AWAITING_REPORTS:
            self.awaiting_reports.popitem(last=False)

    def observed(self, info: RequestInfo, prompt_tokens: int, cached_tokens: int) -> None:
        """A read response's report. A sampled one gives the observed hit ratio of its upstream and
        how far the tree's prediction (matched share of the routing text) was from the cached share,
        and feeds ``--observe-feedback``; one read only for ``--move-evicted-sessions`` (turns of
        sessions that may move: not a fair sample) only reaches its session."""
        up = info.upstream
        if not up or up not in self.pool.upstreams:
            return
        session, turn, sampled, ref = info.session, info.session_turn, info.sampled, info.session_ref
        if session is None:  # read on the observing stream: only reads for the book are not sampled
            found = self.awaiting_reports.pop(info.request_id, None) if info.request_id else None
            session, turn, sampled, ref = found or (None, 0, True, None)
        metrics.OBSERVATIONS.labels("read").inc()
        if sampled:
            metrics.OBSERVED_PROMPT.labels(up).inc(prompt_tokens)
            metrics.OBSERVED_CACHED.labels(up).inc(cached_tokens)
            totals = self.observed_totals.setdefault(up, [0, 0, 0])
            totals[0] += prompt_tokens
            totals[1] += cached_tokens
            totals[2] += 1
        if not info.text_len:
            return
        error = info.matched / info.text_len - cached_tokens / prompt_tokens
        log.debug("observed", request_id=info.request_id, upstream=up, prompt_tokens=prompt_tokens, cached_tokens=cached_tokens,
                  predicted_share=round(info.matched / info.text_len, 3), error=round(error, 3), sampled=sampled)
        observed = observed_chars(cached_tokens, prompt_tokens, info.text_len)
        if sampled:
            metrics.PREDICTION_ERROR.observe(error)
            if self.cfg.observe_feedback:
                self._feed_back(up, info.matched, observed)
        evicted = is_stale(info.matched, observed, self.feedback_rule)
        if session is not None:
            self._report(session, turn, ref, evicted)
        elif info.request_id and self.outbox is not None and self.book is not None:
            # Envoy opened the observing stream to another replica than the deciding one: the
            # session is there (--sync-url)
            if len(info.request_id) <= MAX_REQUEST_ID:
                self.outbox.report(info.request_id, evicted)
            else:
                metrics.SYNC_SESSIONS.labels("forwarded_report", "request_id_too_long").inc()

    def _report(self, session: Session, turn: int, ref: Ref | None, evicted: bool) -> None:
        """A session's report, told to the peers' books too when it counts here (--sync-url)."""
        if report(session, turn, evicted) and ref is not None and self.outbox is not None:
            self._note(ref, "evicted" if evicted else "cached")

    def _note(self, ref: Ref, kind: str) -> None:
        self.outbox.note(SessionNote(*ref, kind))

    def _feed_back(self, up: str, predicted: int, observed: float) -> None:
        """Shrink the upstream's share of the tree on a stale report, grow it back on another
        (extproc.feedback); the sweep then evicts its least recently used entries."""
        held = self.tree.held(up)
        share = next_share(self.shares.get(up), held, predicted, observed, self.feedback_rule, self.cfg.max_tree_size * SWEEP_TO)
        if share is None:
            self.shares.pop(up, None)
        else:
            self.shares[up] = share
        if is_stale(predicted, observed, self.feedback_rule):
            metrics.TREE_SHRINKS.labels(up).inc()
            log.info("tree_share_shrunk", upstream=up, predicted_characters=predicted, observed_characters=int(observed),
                     held=held, share=int(share or 0))
            self.wake_sweeper()

    def budget(self, upstream: str) -> int:
        """Characters ``upstream`` may hold in the tree: ``max_tree_size``, or less where observed
        hits have shown its workers keep less (a sweep trims it to ``SWEEP_TO`` of this: its share)."""
        share = self.shares.get(upstream)
        return self.cfg.max_tree_size if share is None else min(self.cfg.max_tree_size, max(1, int(share / SWEEP_TO)))

    def _routing_input(self, path: str, body: bytes | None, content_encoding: str | None) -> RoutingInput:
        """The payload parser under this configuration's form and caps."""
        return routing_input(path, body, content_encoding=content_encoding, **self.cfg.parse_options())

    def _decide(self, info: RequestInfo, body: bytes | None, loads: dict[str, int], body_too_large: bool) -> Decision:
        if body_too_large:
            ri = RoutingInput("", "", "body_too_large")
        else:
            ri = self._routing_input(info.path, body, info.content_encoding)
        if ri.reason not in _NOT_BAD_INPUT:
            metrics.BAD_INPUT.labels(ri.reason).inc()
            # the path only: a query string may carry a client's secrets
            log.warning("no_routing_text", request_id=info.request_id, reason=ri.reason, path=info.path.split("?", 1)[0])
        elif self.cfg.log_prompts and ri.text:
            log.debug("routing_text", request_id=info.request_id, text=ri.text)
        moved = False
        lately = self.new_prefixes.counts
        if self.book is None:
            decision = decide(self.tree, loads, ri.partition, ri.text, 0.0, self.policy, self.rng, insert=False, lately=lately,
                              workers=self.pool.workers)
        else:
            decision, info.session, moved = decide_following(self.book, self.tree, loads, ri.partition, ri.text, self.policy, self.rng, lately,
                                                             self.pool.workers)
            if info.session is not None:
                info.session_turn = info.session.turns
                info.for_book = self.book.worth_reading(info.session, len(ri.text))
                if self.outbox is not None and (moved or info.for_book or self.cfg.observe_sample > 0):
                    # the name peers know the session by, kept only where a note may need it
                    info.session_ref = reference(ri.partition, ri.text, info.session)
            if moved:
                metrics.SESSION_MOVES.inc()
                log.info("session_moved", request_id=info.request_id, upstream=decision.upstream)
        self.new_prefixes.took(decision.upstream, decision.new_prefix)
        self._learn(ri.partition, ri.text, decision.upstream)
        if moved and info.session_ref is not None:  # after the placement it names
            self._note(info.session_ref, "moved")
        return decision

    def _learn(self, partition: str, text: str, upstream: str) -> None:
        """Insert the routing text for the chosen upstream within its budget (``max_tree_size``):
        at the budget nothing new is learnt and the sweeper is woken to make room."""
        if not text:
            return
        if self.outbox is not None:
            self.outbox.place(partition, text, upstream)
        self._insert(partition, text, upstream, time.monotonic())

    def _insert(self, partition: str, text: str, upstream: str, when: float) -> None:
        budget = self.budget(upstream)
        tree = self.tree
        dropped = tree.partitions_dropped
        if not tree.insert(partition, text, upstream, when, limit=budget):
            metrics.INSERTS_REFUSED.inc()
        if tree.held(upstream) >= budget:
            self.wake_sweeper()
        if tree.partitions_dropped != dropped:
            metrics.PARTITIONS_DROPPED.inc(tree.partitions_dropped - dropped)

    def reports_lost(self) -> None:
        """An access-log stream from Envoy ended: the reports of requests in flight may be lost."""
        self.pool.tickets.reports_lost(time.monotonic())
        if self.outbox is not None:  # the reports of peers' requests may have gone with them
            self.outbox.reports_lost()
        log.warning("access_log_stream_lost", outstanding=self.pool.tickets.outstanding(), grace_secs=self.cfg.lost_report_grace_secs)

    def abandoned(self, info: RequestInfo) -> None:
        """The stream ended before the decision reached Envoy: no finish report will come."""
        if info.ticket:
            self.pool.tickets.release(info.ticket)
            if self.outbox is not None:
                self.outbox.changed()

    def finished(self, ticket: str, outcome: Outcome) -> bool:
        """Envoy reported a request finished, with its ``outcome`` for the router.

        Only a ticket this service issued and still holds acts: it releases the in-flight count
        and its outcome counts for the upstream's health: a refused connection ejects at once (the
        router is down), other failures after ``ejection_failure_threshold`` in a row (one 503 is
        no verdict on a router). Anything else (an unknown, forged or already released ticket)
        changes nothing and returns False. With replicas sharing a view (Envoy sends its access log
        to any of them), a ticket another replica issued is sent on to it.
        """
        return self._finish(ticket, outcome, forward=True)

    def _finish(self, ticket: str, outcome: Outcome, forward: bool) -> bool:
        address = self.pool.tickets.release(ticket)
        if address is None:
            owner = ticket[:16]
            if forward and self.outbox is not None and owner != self.replica_id and REPLICA_ID.fullmatch(owner):
                self.outbox.finish(ticket, outcome.value)
                metrics.FORWARDED_FINISHES.inc()
                return True
            metrics.UNKNOWN_TICKETS.inc()
            return False
        if self.outbox is not None:
            self.outbox.changed()
        up = self.pool.upstreams.get(address)
        if up is None:  # removed from the pool since
            return True
        if outcome is not Outcome.OK:
            cfg = self.cfg
            threshold = 1 if outcome is Outcome.REFUSED else cfg.ejection_failure_threshold
            length = up.request_failed(threshold, cfg.ejection_base_secs, cfg.ejection_max_secs, time.monotonic())
            if length:
                metrics.EJECTIONS.labels(address).inc()
                log.warning("upstream_ejected", upstream=address, seconds=length)
                if self.outbox is not None:  # the other replicas stop sending there too
                    self.outbox.eject(address, length)
        else:
            up.succeeded()
        return True

    # -- the other replicas (extproc.sync carries the messages) ----------------------------------

    def share(self) -> Outbox:
        """Start telling peers what happens here; returns the outbox the sync link drains."""
        self.outbox = Outbox(self.cfg.sync_max_pending)
        return self.outbox

    def counts(self) -> dict[str, int]:
        """This replica's own in-flight count per upstream (what it reports to its peers)."""
        return dict(self.pool.tickets.counts)

    def apply(self, ev: Event, *, placements: bool = True) -> tuple[Seen, int]:
        """A peer's event: its counts join the loads, its placements the tree (for upstreams in
        this pool only, within the budget), its finish reports for this replica's tickets act as
        if Envoy had sent them here, its ejections eject here too. Returns how the event follows the peer's last, and how many
        of its events were missed. ``placements=False``: a snapshot already holds them."""
        seen, missed = self.peers.observe(ev.replica, ev.epoch, ev.seq, ev.counts, time.monotonic())
        if seen is Seen.OLD:
            return seen, 0
        now = time.monotonic()
        if placements:
            self.learn_from(ev)
        for ticket, outcome in ev.finishes:
            if ticket.startswith(self.replica_id):
                self._finish(ticket, Outcome(outcome), forward=False)
        for address, seconds in ev.ejections:
            up = self.pool.upstreams.get(address)
            if up is not None and up.eject_for(seconds, now):
                metrics.EJECTIONS.labels(address).inc()
                log.warning("upstream_ejected", upstream=address, seconds=seconds, by_peer=ev.replica)
        if ev.lost:
            self.pool.tickets.reports_lost(now)
        return seen, missed

    def learn_from(self, ev: Event) -> None:
        """Insert a peer's placements, for upstreams in this pool only, within the budget, each
        learned by the session book and the new-prefix count first (``sessions.learn_placement``);
        then apply the peer's notes on sessions."""
        now = time.monotonic()
        book, policy = self.book, self.policy
        for p in ev.placements:
            if p.upstream in self.pool:
                learn_placement(book, self.new_prefixes, self.tree, p.partition, p.text, p.upstream, policy)
                self._insert(p.partition, p.text, p.upstream, now)
            else:
                metrics.SYNC_REJECTED.labels("unknown_upstream").inc()
        metrics.SYNC_PLACEMENTS.labels("received").inc(len(ev.placements))
        for n in ev.sessions:
            found = book is not None and apply_note(book, (n.partition, n.end, n.tail, n.anchor), n.kind)
            metrics.SYNC_SESSIONS.labels(n.kind, "applied" if found else "unknown").inc()
        for request_id, evicted in ev.reports:  # every replica hears them; the one awaiting it applies it
            awaiting = self.awaiting_reports.pop(request_id, None)
            metrics.SYNC_SESSIONS.labels("forwarded_report", "not_here" if awaiting is None else "applied").inc()
            if awaiting is not None:
                session, turn, _, ref = awaiting
                self._report(session, turn, ref, evicted)

    def expire_peers(self) -> list[str]:
        """Drop peers silent past ``sync_peer_timeout_secs``, with their counts. The access-log
        stream Envoy had open to a dead peer may have carried reports of this replica's requests:
        they are at risk, as when a stream of its own ends (released after the grace)."""
        now = time.monotonic()
        gone = self.peers.expire(now)
        if gone:
            self.pool.tickets.reports_lost(now)
            metrics.SYNC_PEERS_EXPIRED.inc(len(gone))
            log.warning("peers_expired", replicas=gone)
        return gone

    def snapshot_records(self, slice_secs: float = 0.002) -> Iterator[SnapshotRecord | None]:
        """The tree as (partition, text, [(upstream, age in ms)]), with ``None`` about every
        ``slice_secs``, where the caller lets decisions run."""
        now = time.monotonic()
        deadline = time.perf_counter() + slice_secs
        for item in self.tree.branch_ends(step=64):
            if item is not None:
                partition, text, ends = item
                yield partition, text, [(t, max(0, int((now - at) * 1000))) for t, at in ends.items()]
            if time.perf_counter() >= deadline:  # the caller's compressing counts too: it runs between our steps
                yield None
                deadline = time.perf_counter() + slice_secs

    def load_record(self, rec: SnapshotRecord) -> None:
        """One line of a peer's snapshot; upstreams outside this pool are skipped."""
        partition, text, tenants = rec
        now = time.monotonic()
        for upstream, age_ms in tenants:
            if upstream in self.pool:
                self._insert(partition, text[: self.cfg.max_routing_chars], upstream, now - age_ms / 1000)

    # -- the pool --------------------------------------------------------------------------------

    def set_upstreams(self, addresses: list[str]) -> tuple[list[str], list[str]]:
        """Make the pool exactly ``addresses`` (registry order); a removed upstream leaves the
        tree too. Returns (added, removed)."""
        if list(self.pool.upstreams) == addresses:
            return [], []
        added = [a for a in addresses if a not in self.pool]
        removed = self.pool.set_addresses(addresses)
        for tenant in removed:
            self.tree.remove_tenant(tenant)
        if removed:  # the status page's counts stay bounded by the pool
            gone = set(removed)
            self.decided = {k: n for k, n in self.decided.items() if k[0] not in gone}
            for a in gone:
                self.observed_totals.pop(a, None)
                self.shares.pop(a, None)
        return added, removed

    def record_check(self, address: str, ok: bool) -> bool | None:
        """An active health check's result; returns the new state when it changed."""
        up = self.pool.upstreams.get(address)
        if up is None:
            return None
        cfg = self.cfg
        return up.record_check(ok, cfg.health_failure_threshold, cfg.health_success_threshold, time.monotonic())

    def record_workers(self, address: str, workers: int | None) -> bool:
        """How many healthy workers an upstream's router reported (``None``: it did not say, and the
        upstream counts as one worker); whether that changed what the pool knew."""
        if address not in self.pool.upstreams:
            return False
        known = self.pool.workers
        before = known.get(address)
        if workers is None:
            known.pop(address, None)
        else:
            known[address] = workers
        return known.get(address) != before

    def addresses(self) -> list[str]:
        return list(self.pool.upstreams)

    def upstreams(self) -> list[UpstreamView]:
        chars = self.tree.tenant_chars()
        pool = self.pool
        now = time.monotonic()
        return [
            UpstreamView(
                a, u.healthy, u.active_ok, u.ejected, pool.inflight(a), chars.get(a, 0),
                max(0.0, u.ejected_until - now) if u.ejected else 0.0, u.failures, pool.workers.get(a, 0),
            )
            for a, u in pool.upstreams.items()
        ]

    def tree_stats(self) -> TreeStats:
        t = self.tree
        observed = {a: ratio for a, (ratio, _) in self.observed_hits().items()}
        learnt = {a: self.budget(a) for a in self.shares}
        return TreeStats(t.total_chars(), t.node_count(), t.tenant_chars(), self.cfg.max_tree_size, observed, learnt)

    def explain(self, path: str, body: bytes | None, content_encoding: str | None = None) -> dict:
        """The decision this request would get now, with every upstream's match; inserts nothing."""
        ri = self._routing_input(path, body, content_encoding)
        m = self.tree.match(ri.partition, ri.text)
        loads = self.pool.loads()
        terms: dict[str, tuple[int, int, int]] = {}
        observed = self.observed_hits()
        # the session the request belongs to, as --move-evicted-sessions would count it (kept as it is)
        outlook = self.book.outlook(ri.partition, ri.text, m, continues(m, self.policy)) if self.book is not None else None
        new_prefix = False
        if loads:
            rng = random.Random(0)
            d = decide(self.tree, loads, ri.partition, ri.text, time.monotonic(), self.policy, rng, insert=False, lately=self.new_prefixes.counts,
                       workers=self.pool.workers)
            d = moved_if_due(d, outlook is not None and outlook.moves, m, loads, self.policy, rng)
            upstream, reason, new_prefix = d.upstream, d.reason, d.new_prefix
            if self.policy.hit_choice == "cost" and ri.text:
                terms = costs(m, loads, self.policy, self.new_prefixes.counts if d.new_prefix else None, self.pool.workers)
        else:
            upstream, reason = None, "no_healthy_upstream"
        return {
            "upstream": upstream,
            "reason": reason,
            "partition": ri.partition,
            "text_characters": len(ri.text),
            "matched_characters": m.matched,
            "match_rate": m.matched / len(ri.text) if ri.text else 0.0,
            "continuation": continues(m, self.policy),
            # the decision weighed the new prefixes each upstream took lately (--new-prefix-window): the
            # decision's own flag, so a choice by load alone (imbalance) or by another --hit-choice says no
            "new_prefix": new_prefix,
            "upstreams": [
                {"address": v.address, "matched_characters": m.tenants.get(v.address, 0), "inflight": v.inflight, "healthy": v.healthy,
                 "new_prefixes_lately": self.new_prefixes.counts.get(v.address, 0),
                 "workers": v.workers, "continuation_knee": knee(self.policy, v.address, self.pool.workers),
                 **dict(zip(("recompute_characters", "charged_requests", "cost"), terms.get(v.address, (0, 0, 0)))),
                 **dict(zip(("observed_hit_ratio", "observed_responses"), observed.get(v.address, (0.0, 0))))}
                for v in self.upstreams()
            ],
            "no_text_reason": ri.reason,
            "routing_text_head": ri.text[:200],  # the caller sent the body: no privacy to keep
            "session": None if outlook is None else asdict(outlook),
        }

    # -- housekeeping ----------------------------------------------------------------------------

    def evict_slices(self, slice_secs: float = 0.002) -> Iterator[None]:
        """The eviction sweep cut into slices of about ``slice_secs``: the caller yields to the
        event loop between them, so a sweep never holds up a decision for long. Each upstream over
        ``SWEEP_TO`` of its budget is trimmed to it, so that the next sweep is not due at the next
        insert. Removing a tenant that left the pool is not sliced: it visits only that tenant's
        nodes."""
        deadline = time.perf_counter() + slice_secs
        for tenant in list(self.tree.tenant_chars()):
            if tenant not in self.pool:
                self.tree.remove_tenant(tenant)
                continue
            target = int(self.budget(tenant) * SWEEP_TO)
            removed = 0
            for removed in self.tree.evict_steps(tenant, target):
                if time.perf_counter() >= deadline:
                    yield
                    deadline = time.perf_counter() + slice_secs
            if removed:
                metrics.EVICTED_CHARS.inc(removed)
                log.info("evicted", upstream=tenant, characters=removed)

    def expire(self) -> None:
        """Release in-flight entries whose finish report never came."""
        expired = self.pool.tickets.expire(time.monotonic())
        if expired:
            metrics.EXPIRED_TICKETS.inc(expired)
            log.warning("inflight_expired", count=expired)
