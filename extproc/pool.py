"""The upstream pool: the configured SGLang routers in registry order and their in-flight counts.

Health lives in :mod:`extproc.upstream`, tickets in :mod:`extproc.inflight`; the pool only keeps
them together so that a load snapshot is one dictionary read per upstream.
"""

from __future__ import annotations

from .inflight import Tickets
from .upstream import Upstream


class Pool:
    __slots__ = ("upstreams", "tickets")

    def __init__(self, inflight_timeout: float, lost_report_grace: float | None = None) -> None:
        self.upstreams: dict[str, Upstream] = {}
        self.tickets = Tickets(inflight_timeout, lost_report_grace)

    def set_addresses(self, addresses: list[str]) -> list[str]:
        """Replace the pool, keeping the state of upstreams that stay. Returns the removed ones."""
        new = {a: self.upstreams.get(a) or Upstream(a) for a in addresses}
        removed = [a for a in self.upstreams if a not in new]
        self.upstreams = new
        return removed

    def __contains__(self, address: str) -> bool:
        return address in self.upstreams

    def loads(self) -> dict[str, int]:
        """In-flight per healthy upstream, in registry order."""
        counts = self.tickets.counts
        return {a: counts.get(a, 0) for a, u in self.upstreams.items() if u.healthy}

    def inflight(self, address: str) -> int:
        return self.tickets.counts.get(address, 0)
