"""In-flight tickets: which requests were sent to which upstream and have not finished yet.

A ticket is issued when a decision is made and travels with the request as a header; Envoy's access
log reports it back when the response has finished, which releases it. A stream that fails before
its decision reached Envoy releases its ticket at once.

Reports get lost when an access-log stream breaks or Envoy restarts (it kills its requests, and
the entries it had not sent yet go with it). The service cannot know which tickets those were, so
a lost stream marks every ticket issued before it as at risk, and :meth:`Tickets.expire` releases
the at-risk tickets still open ``grace`` seconds after the loss: counts reconcile within that
bound instead of the timeout, at the price of forgetting a request that outlives the grace. As a
last resort any ticket older than the timeout is released, so that no lost report can leave a
count high forever.
Tickets are 128 random bits (after the issuing replica's id): nobody can guess one to release or
fail another request.
"""

from __future__ import annotations

import secrets


class Tickets:
    """Outstanding tickets and the count each upstream has in flight."""

    __slots__ = ("timeout", "grace", "_open", "counts", "_losses", "prefix")

    def __init__(self, timeout: float, grace: float | None = None, prefix: str = "") -> None:
        self.prefix = prefix  # the replica's id: any replica can tell whose ticket it holds
        self.timeout = timeout
        self.grace = timeout if grace is None else grace
        self._open: dict[str, tuple[str, float]] = {}  # ticket -> (upstream, issued at), oldest first
        self.counts: dict[str, int] = {}
        self._losses: list[float] = []  # when reports were lost, oldest first

    def issue(self, upstream: str, now: float) -> str:
        ticket = self.prefix + secrets.token_urlsafe(16)
        self._open[ticket] = (upstream, now)
        self.counts[upstream] = self.counts.get(upstream, 0) + 1
        return ticket

    def release(self, ticket: str) -> str | None:
        """Finish a ticket; returns its upstream, or None for an unknown or already released one."""
        entry = self._open.pop(ticket, None)
        if entry is None:
            return None
        upstream = entry[0]
        n = self.counts[upstream]  # an open ticket always counts
        if n > 1:
            self.counts[upstream] = n - 1
        else:
            del self.counts[upstream]
        return upstream

    def reports_lost(self, now: float) -> None:
        """An access-log stream ended: reports of requests in flight now may never come."""
        self._losses.append(now)

    def expire(self, now: float) -> int:
        """Release tickets older than ``timeout``, and those at risk since a loss more than
        ``grace`` ago; returns how many."""
        settled = [t for t in self._losses if now - t > self.grace]
        cutoff = settled[-1] if settled else float("-inf")  # tickets issued before it are gone
        self._losses = self._losses[len(settled):]
        old = [t for t, (_, at) in self._open.items() if at < cutoff or now - at > self.timeout]
        for t in old:
            self.release(t)
        return len(old)

    def outstanding(self) -> int:
        return len(self._open)
