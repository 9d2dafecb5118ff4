"""Upstream addresses: ``HOST:PORT`` entries and the ``IP:PORT`` literals Envoy's ORIGINAL_DST needs.

ORIGINAL_DST accepts exactly one IP literal with a port, so every address the service puts in the
header passes through here first. Resolving a name blocks (getaddrinfo): callers on the event loop
run :func:`resolve_all` in a thread.
"""

from __future__ import annotations

import ipaddress
import socket


# Never an upstream, whatever the allowed networks say: link-local (169.254.169.254 is the cloud
# metadata service), the metadata addresses inside private ranges, unspecified, multicast, broadcast.
ALWAYS_DENIED = tuple(
    ipaddress.ip_network(n)
    for n in ("169.254.0.0/16", "fe80::/10", "100.100.100.200/32", "fd00:ec2::254/128", "0.0.0.0/8", "::/128",
              "224.0.0.0/4", "ff00::/8", "255.255.255.255/32")
)


class AddressPolicy:
    """Which addresses may be upstreams: inside an allowed network and outside ``ALWAYS_DENIED``.

    ORIGINAL_DST connects wherever the header points and Envoy forwards the client's request, its
    ``Authorization`` header included: an address from a poisoned DNS answer, a file or the admin
    API must not become a place where clients' requests go.
    """

    def __init__(self, allowed: tuple[str, ...]) -> None:
        self.allowed = tuple(ipaddress.ip_network(n) for n in allowed)

    def refusal(self, address: str) -> str | None:
        """Why ``address`` (an ``IP:PORT`` literal) may not be an upstream, or None."""
        host, _ = parse_hostport(address)
        ip = ipaddress.ip_address(host)
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if any(ip in n for n in ALWAYS_DENIED):
            return f"{address} is link-local, metadata, multicast or unspecified: never an upstream"
        if not any(ip.version == n.version and ip in n for n in self.allowed):
            return f"{address} is outside --allowed-upstream-cidrs"
        return None


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


def literal(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int) -> str:
    """The ``IP:PORT`` form Envoy parses (``[V6]:PORT`` for IPv6)."""
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"


def resolve_all(entry: str) -> list[str]:
    """Every ``IP:PORT`` literal of one ``HOST:PORT`` entry, sorted; raises AddressError. Blocks."""
    host, port = parse_hostport(entry)
    try:
        ips = [ipaddress.ip_address(host)]
    except ValueError:
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as exc:
            raise AddressError(f"{entry!r}: cannot resolve {host!r} ({exc.strerror or exc})") from None
        ips = sorted({ipaddress.ip_address(i[4][0]) for i in infos}, key=lambda ip: (ip.version, ip))
    return [literal(ip, port) for ip in ips]
