"""The upstream pool: which SGLang routers exist, which are healthy, and how loaded each is.

Load is the number of requests this service sent to an upstream whose responses have not finished
yet. A request is *acquired* when the decision is made and *released* when Envoy reports the request
finished (its gRPC access log), when its ext_proc stream fails before the decision reached Envoy, or,
as a last resort, after ``inflight_timeout`` seconds, so that no lost report can leave a count high
forever.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field


class AddressError(ValueError):
    """An upstream address that cannot be turned into the IP:PORT literal ORIGINAL_DST needs."""


def parse_hostport(value: str, allow_zero: bool = False) -> tuple[str, int]:
    """Split ``HOST:PORT`` / ``[V6]:PORT``; validates the port (0 only for a listen address)."""
    value = value.strip()
    if value.startswith("["):
        host, sep, port = value[1:].partition("]:")
        if not sep:
            raise AddressError(f"{value!r} is not [IPv6]:PORT")
    else:
        host, sep, port = value.rpartition(":")
        if not sep or not host:
            raise AddressError(f"{value!r} is not HOST:PORT")
    if not port.isdigit() or not (0 if allow_zero else 1) <= int(port) < 65536:
        raise AddressError(f"{value!r} has no valid port ({0 if allow_zero else 1}-65535)")
    return host, int(port)


@dataclass(slots=True)
class Upstream:
    """One SGLang router. It takes traffic while the active check says up and it is not ejected."""

    address: str
    inflight: int = 0
    active_ok: bool = True  # the active checker's verdict
    failures: int = 0  # consecutive failed active checks
    successes: int = 0  # consecutive good active checks while down
    ejected: bool = False  # passive ejection: out until a good active check after ejected_until
    ejected_until: float = 0.0  # monotonic clock
    ejections: int = 0  # consecutive ejections: the back-off doubles with each

    @property
    def healthy(self) -> bool:
        return self.active_ok and not self.ejected

    @healthy.setter
    def healthy(self, value: bool) -> None:
        self.active_ok = value
        if value:
            self.ejected = False


@dataclass
class Pool:
    """The configured upstreams in registry order, with in-flight bookkeeping."""

    upstreams: dict[str, Upstream] = field(default_factory=dict)
    inflight_timeout: float = 900.0
    _tickets: dict[str, tuple[str, float]] = field(default_factory=dict)

    @classmethod
    def from_addresses(cls, addresses: list[str], inflight_timeout: float = 900.0) -> "Pool":
        pool = cls(inflight_timeout=inflight_timeout)
        pool.set_addresses(addresses)
        return pool

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
        return {a: u.inflight for a, u in self.upstreams.items() if u.healthy}

    # -- health ----------------------------------------------------------------------------------

    def record_check(
        self, address: str, ok: bool, failure_threshold: int, success_threshold: int, now: float | None = None
    ) -> bool | None:
        """An active check's result; returns the new state when it changed (True up, False down).

        An ejected upstream returns only on a good check once its back-off has passed, so a dead
        router stays out until the checks take it out for good.
        """
        up = self.upstreams.get(address)
        if up is None:
            return None
        if ok:
            up.failures = 0
            if up.ejected and (time.monotonic() if now is None else now) >= up.ejected_until:
                up.ejected = False
                if up.active_ok:
                    return True
            if up.active_ok:
                return None
            up.successes += 1
            if up.successes >= success_threshold:
                up.active_ok, up.successes = True, 0
                return True
            return None
        up.successes = 0
        up.failures += 1
        if up.active_ok and up.failures >= failure_threshold:
            up.active_ok = False
            return False
        return None

    def eject(self, address: str, base: float, cap: float, now: float | None = None) -> float:
        """Passive ejection after a failure seen on real traffic; returns its length in seconds."""
        up = self.upstreams.get(address)
        if up is None:
            return 0.0
        if up.ejected:  # already out: failures of requests sent before do not extend it
            return 0.0
        now = time.monotonic() if now is None else now
        length = min(cap, base * (2 ** up.ejections))
        up.ejections += 1
        up.ejected, up.ejected_until = True, now + length
        return length

    def succeeded(self, address: str) -> None:
        """A request finished well: the next ejection starts from the base back-off again."""
        up = self.upstreams.get(address)
        if up is not None and up.ejections and not up.ejected:
            up.ejections = 0

    # -- in-flight tickets -----------------------------------------------------------------------

    def acquire(self, ticket: str, address: str, now: float | None = None) -> None:
        up = self.upstreams.get(address)
        if up is None or ticket in self._tickets:
            return
        up.inflight += 1
        self._tickets[ticket] = (address, time.monotonic() if now is None else now)

    def release(self, ticket: str) -> str | None:
        """Finish a ticket; returns its upstream, or None for an unknown or already released one."""
        entry = self._tickets.pop(ticket, None)
        if entry is None:
            return None
        up = self.upstreams.get(entry[0])
        if up is not None and up.inflight > 0:
            up.inflight -= 1
        return entry[0]

    def expire(self, now: float | None = None) -> int:
        """Release tickets older than ``inflight_timeout``; returns how many."""
        now = time.monotonic() if now is None else now
        old = [t for t, (_, at) in self._tickets.items() if now - at > self.inflight_timeout]
        for t in old:
            self.release(t)
        return len(old)

    def outstanding(self) -> int:
        return len(self._tickets)
