"""The request lifecycle, free of gRPC: headers in, body in, a routing decision out, then a finish.

The handler (``handlers.py``) turns ext_proc messages into calls here; the director asks the payload
parser for the routing text, the policy for the upstream, and the pool for the in-flight count.
Nothing in here raises into the stream: a failure in parsing or deciding still yields a healthy
upstream (the least loaded), counted and logged.
"""

from __future__ import annotations

import itertools
import os
from typing import Iterator
import random
import time
from dataclasses import dataclass

from . import logs, metrics
from .config import Config
from .payload import RoutingInput, routing_input
from .policy import Decision, decide, least_loaded
from .pool import Pool
from .tree import RadixTree

log = logs.get("prefix_router.director")


@dataclass(slots=True)
class RequestInfo:
    """What the director keeps of one request between its headers and its decision."""

    path: str = ""
    method: str = ""
    content_encoding: str | None = None
    request_id: str = ""
    ticket: str = ""


@dataclass(frozen=True, slots=True)
class Routed:
    """A decision as the handler needs it: an address to set, or ``None`` for a 503."""

    address: str | None
    reason: str
    matched: int = 0
    text_len: int = 0


class Director:
    def __init__(self, cfg: Config, pool: Pool, tree: RadixTree | None = None, seed: int | None = None) -> None:
        self.cfg = cfg
        self.policy = cfg.policy()
        self.pool = pool
        self.tree = tree or RadixTree()
        self.rng = random.Random(seed)
        # Tickets tie a decision to Envoy's access-log report of the finished request. They are
        # unique per process start, and the client cannot forge one that collides.
        self._ticket_prefix = f"{os.getpid():x}-{int(time.time() * 1000):x}-"
        self._ticket_seq = itertools.count(1)

    def reconfigure(self, cfg: Config) -> None:
        self.cfg = cfg
        self.policy = cfg.policy()

    def begin(self, headers: dict[str, str]) -> RequestInfo:
        return RequestInfo(
            path=headers.get(":path", ""),
            method=headers.get(":method", ""),
            content_encoding=headers.get("content-encoding"),
            request_id=headers.get("x-request-id", ""),
            ticket=self._ticket_prefix + str(next(self._ticket_seq)),
        )

    def route(self, info: RequestInfo, body: bytes | None, *, body_too_large: bool = False) -> Routed:
        """Decide for one request and count it in flight on the chosen upstream."""
        started = time.perf_counter()
        loads = self.pool.loads()
        if not loads:
            metrics.NO_UPSTREAM.inc()
            log.warning("no_healthy_upstream", request_id=info.request_id)
            return Routed(None, "no_healthy_upstream")
        try:
            decision = self._decide(info, body, loads, body_too_large)
        except Exception:  # a bug must not cost the request: fall back to load balancing
            metrics.DECISION_ERRORS.inc()
            log.exception("decision_failed", request_id=info.request_id)
            decision = Decision(least_loaded(loads, self.policy.tie_break, self.rng), "fallback")
        self.pool.acquire(info.ticket, decision.upstream)
        elapsed = time.perf_counter() - started
        metrics.DECISIONS.labels(decision.reason).inc()
        metrics.DECISION_SECONDS.observe(elapsed)
        if decision.text_len:
            metrics.MATCH_RATE.observe(decision.matched / decision.text_len)
        log.debug(
            "decision",
            request_id=info.request_id,
            upstream=decision.upstream,
            reason=decision.reason,
            matched=decision.matched,
            text_len=decision.text_len,
            decision_us=round(elapsed * 1e6, 1),
        )
        return Routed(decision.upstream, decision.reason, decision.matched, decision.text_len)

    def _routing_input(self, path: str, body: bytes | None, content_encoding: str | None) -> RoutingInput:
        """The payload parser under this configuration's form and caps."""
        cfg = self.cfg
        return routing_input(
            path, body, content_encoding=content_encoding, form=cfg.routing_text,
            max_routing_chars=cfg.max_routing_chars, max_body_bytes=cfg.max_body_bytes,
        )

    def _decide(self, info: RequestInfo, body: bytes | None, loads: dict[str, int], body_too_large: bool) -> Decision:
        if body_too_large:
            parsed_reason, partition, text = "body_too_large", "", ""
        else:
            ri = self._routing_input(info.path, body, info.content_encoding)
            parsed_reason, partition, text = ri.reason, ri.partition, ri.text
        if parsed_reason is not None and parsed_reason not in ("no_routing_endpoint", "empty_body"):
            metrics.BAD_INPUT.labels(parsed_reason).inc()
            log.warning("no_routing_text", request_id=info.request_id, reason=parsed_reason, path=info.path)
        elif self.cfg.log_prompts and text:
            log.debug("routing_text", request_id=info.request_id, text=text)
        return decide(self.tree, loads, partition, text, time.monotonic(), self.policy, self.rng)

    def explain(self, path: str, body: bytes | None, content_encoding: str | None = None) -> dict:
        """The decision this request would get now, with every upstream's match; inserts nothing."""
        ri = self._routing_input(path, body, content_encoding)
        m = self.tree.match(ri.partition, ri.text)
        loads = self.pool.loads()
        if loads:
            d = decide(self.tree, loads, ri.partition, ri.text, time.monotonic(), self.policy, random.Random(0), insert=False)
            upstream, reason = d.upstream, d.reason
        else:
            upstream, reason = None, "no_healthy_upstream"
        return {
            "upstream": upstream,
            "reason": reason,
            "partition": ri.partition,
            "text_characters": len(ri.text),
            "matched_characters": m.matched,
            "match_rate": m.matched / len(ri.text) if ri.text else 0.0,
            "upstreams": [
                {"address": a, "matched_characters": m.tenants.get(a, 0), "inflight": u.inflight, "healthy": u.healthy}
                for a, u in self.pool.upstreams.items()
            ],
            "no_text_reason": ri.reason,
            "routing_text_head": ri.text[:200],  # the caller sent the body: no privacy to keep
        }

    # -- the end of a request --------------------------------------------------------------------

    def finished(self, ticket: str, failed: bool = False, upstream: str = "") -> bool:
        """Envoy reported a request finished; ``failed``: the upstream refused or broke it.

        The ticket releases this replica's in-flight count if it owns it. The outcome counts for
        the upstream's health whichever replica routed the request (each replica receives every
        report when several run).
        """
        address = self.pool.release(ticket) or upstream
        if address not in self.pool:
            return False
        if failed:
            length = self.pool.eject(address, self.cfg.ejection_base_secs, self.cfg.ejection_max_secs)
            if length:
                metrics.EJECTIONS.labels(address).inc()
                log.warning("upstream_ejected", upstream=address, seconds=length)
        else:
            self.pool.succeeded(address)
        return True

    def abandoned(self, info: RequestInfo) -> None:
        """The stream ended before the decision reached Envoy: no finish report will come."""
        self.pool.release(info.ticket)

    # -- housekeeping ----------------------------------------------------------------------------

    def evict_slices(self, slice_secs: float = 0.002) -> Iterator[None]:
        """The eviction sweep cut into slices of about ``slice_secs``: the caller yields to the
        event loop between them, so a sweep never holds up a decision for long."""
        deadline = time.perf_counter() + slice_secs
        for tenant in list(self.tree.tenant_chars()):
            if tenant not in self.pool:
                self.tree.remove_tenant(tenant)
                continue
            removed = 0
            for removed in self.tree.evict_steps(tenant, self.cfg.max_tree_size):
                if time.perf_counter() >= deadline:
                    yield
                    deadline = time.perf_counter() + slice_secs
            if removed:
                metrics.EVICTED_CHARS.inc(removed)
                log.info("evicted", upstream=tenant, characters=removed)

    def expire(self) -> None:
        """Release in-flight entries whose finish report never came."""
        expired = self.pool.expire()
        if expired:
            metrics.EXPIRED_TICKETS.inc(expired)
            log.warning("inflight_expired", count=expired)
