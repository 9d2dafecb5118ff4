"""What one replica knows of the others, and what it has yet to tell them.

:class:`Peers` keeps each peer's last in-flight counts and the sequence number of its last event,
so that the load the policy sees is this replica's own plus every live peer's, and so that a
missed message is noticed (a gap in sequence numbers: the tree may lack the peer's placements, a
snapshot mends it). A peer silent past the timeout is dropped with its counts: a killed replica's
requests stop weighing on the others.

:class:`Outbox` collects what happened since the last message: placements, finish reports for
other replicas' tickets, lost reports. It is bounded; what it cannot hold is dropped and counted.

Nothing here does I/O: the sync link (:mod:`extproc.sync`) drains the outbox and feeds peers'
events to the director.
"""

from __future__ import annotations

import enum
import os
import secrets
import time
from dataclasses import dataclass, field

from .syncwire import Placement, SessionNote


GONE_KEPT = 1024  # silent peers remembered


def new_replica_id() -> str:
    return secrets.token_hex(8)


def new_epoch() -> int:
    """Tells a restarted replica from its earlier life (same id or not): its start, in ns."""
    return time.time_ns() ^ (os.getpid() & 0xFFFF)


class Seen(enum.Enum):
    NEW = "new"  # a peer not known before (or restarted: a new epoch)
    NEXT = "next"  # the message after the last one
    GAP = "gap"  # messages were missed
    OLD = "old"  # a repeat or out of order: counts ignored


@dataclass(slots=True)
class Peer:
    epoch: int
    seq: int
    counts: dict[str, int]
    seen: float


@dataclass
class Peers:
    timeout: float
    peers: dict[str, Peer] = field(default_factory=dict)
    totals: dict[str, int] = field(default_factory=dict)  # in flight per upstream, summed over peers
    # (epoch, seq) of peers dropped for silence, so that one that comes back (a partition healed)
    # is known to have sent events meanwhile; bounded, oldest forgotten first
    gone: dict[str, tuple[int, int]] = field(default_factory=dict)

    def observe(self, replica: str, epoch: int, seq: int, counts: dict[str, int], now: float) -> tuple[Seen, int]:
        """Take a peer's event; returns how it follows the last one and how many were missed."""
        p = self.peers.get(replica)
        if p is None and replica in self.gone:
            last_epoch, last_seq = self.gone.pop(replica)
            if epoch == last_epoch and seq > last_seq:
                self._set_counts({}, counts)
                self.peers[replica] = Peer(epoch, seq, dict(counts), now)
                missed = seq - last_seq - 1
                return (Seen.GAP if missed else Seen.NEXT), missed
        if p is None or epoch != p.epoch:
            if p is not None and epoch < p.epoch:
                return Seen.OLD, 0  # a message from the peer's earlier life, delivered late
            self._set_counts(p.counts if p else {}, counts)
            self.peers[replica] = Peer(epoch, seq, dict(counts), now)
            return Seen.NEW, 0
        if seq <= p.seq:
            p.seen = now
            return Seen.OLD, 0
        missed = seq - p.seq - 1
        self._set_counts(p.counts, counts)
        p.counts, p.seq, p.seen = dict(counts), seq, now
        return (Seen.GAP if missed else Seen.NEXT), missed

    def _set_counts(self, old: dict[str, int], new: dict[str, int]) -> None:
        totals = self.totals
        for a, n in old.items():
            left = totals.get(a, 0) - n
            if left > 0:
                totals[a] = left
            else:
                totals.pop(a, None)
        for a, n in new.items():
            if n:
                totals[a] = totals.get(a, 0) + n

    def expire(self, now: float) -> list[str]:
        """Drop peers silent for longer than the timeout; returns their ids."""
        gone = [r for r, p in self.peers.items() if now - p.seen > self.timeout]
        for r in gone:
            p = self.peers.pop(r)
            self._set_counts(p.counts, {})
            self.gone[r] = (p.epoch, p.seq)
            while len(self.gone) > GONE_KEPT:
                del self.gone[next(iter(self.gone))]
        return gone

    def watermark(self) -> dict[str, tuple[int, int]]:
        return {r: (p.epoch, p.seq) for r, p in self.peers.items()}


@dataclass
class Outbox:
    """What this replica has to tell its peers (placements, finish reports for their tickets,
    ejections, lost reports, notes on followed sessions); ``wake`` is called when something is added
    (the link then sends at the end of the event loop's turn, batching a burst)."""

    limit: int
    max_chars: int = 1 << 24  # routing text held unsent, all placements together
    placements: list[Placement] = field(default_factory=list)
    finishes: list[tuple[str, str]] = field(default_factory=list)
    ejections: list[tuple[str, float]] = field(default_factory=list)
    sessions: list[SessionNote] = field(default_factory=list)
    reports: list[tuple[str, bool]] = field(default_factory=list)
    lost: bool = False
    dirty: bool = False  # counts changed since the last message
    dropped: int = 0  # placements or finishes refused at the limit since the last take
    chars: int = 0

    def __post_init__(self) -> None:
        self.wake = lambda: None  # something to send
        self.urgent = lambda: None  # a placement: peers should hear of it at once

    def place(self, partition: str, text: str, upstream: str) -> None:
        if len(self.placements) >= self.limit or self.chars + len(text) > self.max_chars:
            self.dropped += 1
        else:
            self.placements.append(Placement(partition, upstream, text))
            self.chars += len(text)
        self.changed()
        self.urgent()

    def _add(self, items: list, item: object) -> None:
        """Append within ``limit``, counting what is refused."""
        if len(items) >= self.limit:
            self.dropped += 1
        else:
            items.append(item)
        self.changed()

    def finish(self, ticket: str, outcome: str) -> None:
        self._add(self.finishes, (ticket, outcome))

    def eject(self, upstream: str, seconds: float) -> None:
        if len(self.ejections) < self.limit:
            self.ejections.append((upstream, seconds))
        self.changed()

    def note(self, n: SessionNote) -> None:
        """A session moved, or its report read: peers' books must know before its next turn."""
        self._add(self.sessions, n)
        self.urgent()

    def report(self, request_id: str, evicted: bool) -> None:
        """A response read here for a request another replica decided: its session is there."""
        self._add(self.reports, (request_id, evicted))
        self.urgent()

    def reports_lost(self) -> None:
        self.lost = True
        self.changed()

    def changed(self) -> None:
        if not self.dirty:
            self.dirty = True
            self.wake()

    def take(self) -> tuple[list[Placement], list[tuple[str, str]], bool, int, list[tuple[str, float]], list[SessionNote], list[tuple[str, bool]]]:
        out = (self.placements, self.finishes, self.lost, self.dropped, self.ejections, self.sessions, self.reports)
        self.placements, self.finishes, self.lost, self.dirty, self.dropped = [], [], False, False, 0
        self.ejections, self.sessions, self.reports = [], [], []
        self.chars = 0
        return out
