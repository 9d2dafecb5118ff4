"""The upstream pool: which SGLang routers exist, which are healthy, and how loaded each is.

Load is the number of requests this service sent to an upstream whose responses have not finished
yet. A request is *acquired* when the decision is made and *released* when Envoy reports the request
finished (its gRPC access log), when its ext_proc stream fails before the decision reached Envoy, or,
as a last resort, after ``inflight_timeout`` seconds, so that no lost report can leave a count high
forever.
"""

from __future__ import annotations

import ipaddress
import socket
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


def resolve_upstream(value: str) -> str:
    """The ``IP:PORT`` literal for an upstream given as ``HOST:PORT`` (hostnames resolved once)."""
    host, port = parse_hostport(value)
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as exc:
            raise AddressError(f"{value!r}: cannot resolve {host!r} ({exc.strerror or exc})") from None
        ip = ipaddress.ip_address(infos[0][4][0])
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"


@dataclass(slots=True)
class Upstream:
    address: str
    healthy: bool = True
    inflight: int = 0


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

    # -- in-flight tickets -----------------------------------------------------------------------

    def acquire(self, ticket: str, address: str, now: float | None = None) -> None:
        up = self.upstreams.get(address)
        if up is None or ticket in self._tickets:
            return
        up.inflight += 1
        self._tickets[ticket] = (address, time.monotonic() if now is None else now)

    def release(self, ticket: str) -> bool:
        """Finish a ticket; unknown or already released tickets are ignored (returns False)."""
        entry = self._tickets.pop(ticket, None)
        if entry is None:
            return False
        up = self.upstreams.get(entry[0])
        if up is not None and up.inflight > 0:
            up.inflight -= 1
        return True

    def expire(self, now: float | None = None) -> int:
        """Release tickets older than ``inflight_timeout``; returns how many."""
        now = time.monotonic() if now is None else now
        old = [t for t, (_, at) in self._tickets.items() if now - at > self.inflight_timeout]
        for t in old:
            self.release(t)
        return len(old)

    def outstanding(self) -> int:
        return len(self._tickets)
