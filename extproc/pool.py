"""The upstream pool: the configured SGLang routers in registry order and their in-flight counts
(this replica's tickets plus what its peers report).

Health lives in :mod:`extproc.upstream`, tickets in :mod:`extproc.inflight`; the pool only keeps
them together so that a load snapshot is one dictionary read per upstream.
"""

from __future__ import annotations

from .inflight import Tickets
from .upstream import Upstream


class Pool:
    __slots__ = ("upstreams", "tickets", "peer_counts", "workers")

    def __init__(self, inflight_timeout: float, lost_report_grace: float | None = None, ticket_prefix: str = "") -> None:
        self.upstreams: dict[str, Upstream] = {}
        self.tickets = Tickets(inflight_timeout, lost_report_grace, ticket_prefix)
        # In flight per upstream on the other replicas (their last reports, summed), kept by
        # :class:`extproc.replicas.Peers`; empty when the service runs alone.
        self.peer_counts: dict[str, int] = {}
        # Healthy workers per upstream, as its router last reported them (``--workers-endpoint``):
        # the policy's knee (``policy.knee``). An upstream missing here counts as one worker.
        self.workers: dict[str, int] = {}

    def set_addresses(self, addresses: list[str]) -> list[str]:
        """Replace the pool, keeping the state of upstreams that stay. Returns the removed ones."""
        new = {a: self.upstreams.get(a) or Upstream(a) for a in addresses}
        removed = [a for a in self.upstreams if a not in new]
        self.upstreams = new
        for a in removed:
            self.workers.pop(a, None)
        return removed

    def __contains__(self, address: str) -> bool:
        return address in self.upstreams

    def loads(self) -> dict[str, int]:
        """In-flight per healthy upstream (this replica's and its peers'), in registry order."""
        counts, peers = self.tickets.counts, self.peer_counts
        if not peers:
            return {a: counts.get(a, 0) for a, u in self.upstreams.items() if u.healthy}
        return {a: counts.get(a, 0) + peers.get(a, 0) for a, u in self.upstreams.items() if u.healthy}

    def inflight(self, address: str) -> int:
        return self.tickets.counts.get(address, 0) + self.peer_counts.get(address, 0)
