"""In-flight tickets: which requests were sent to which upstream and have not finished yet.

A ticket is issued when a decision is made and travels with the request as a header; Envoy's access
log reports it back when the response has finished, which releases it. A stream that fails before
its decision reached Envoy releases its ticket at once; as a last resort a ticket older than the
timeout is released by :meth:`Tickets.expire`, so that no lost report can leave a count high forever.
Tickets are 128 random bits: nobody can guess one to release or fail another request.
"""

from __future__ import annotations

import secrets


class Tickets:
    """Outstanding tickets and the count each upstream has in flight."""

    __slots__ = ("timeout", "_open", "counts")

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._open: dict[str, tuple[str, float]] = {}  # ticket -> (upstream, issued at)
        self.counts: dict[str, int] = {}

    def issue(self, upstream: str, now: float) -> str:
        ticket = secrets.token_urlsafe(16)
        self._open[ticket] = (upstream, now)
        self.counts[upstream] = self.counts.get(upstream, 0) + 1
        return ticket

    def release(self, ticket: str) -> str | None:
        """Finish a ticket; returns its upstream, or None for an unknown or already released one."""
        entry = self._open.pop(ticket, None)
        if entry is None:
            return None
        upstream = entry[0]
        n = self.counts.get(upstream, 0)
        if n > 1:
            self.counts[upstream] = n - 1
        else:
            self.counts.pop(upstream, None)
        return upstream

    def expire(self, now: float) -> int:
        """Release tickets older than ``timeout``; returns how many."""
        old = [t for t, (_, at) in self._open.items() if now - at > self.timeout]
        for t in old:
            self.release(t)
        return len(old)

    def outstanding(self) -> int:
        return len(self._open)
