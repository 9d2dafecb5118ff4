"""Upstream addresses: ``HOST:PORT`` entries and the ``IP:PORT`` literals Envoy's ORIGINAL_DST needs.

ORIGINAL_DST accepts exactly one IP literal with a port, so every address the service puts in the
header passes through here first. Resolving a name blocks (getaddrinfo): callers on the event loop
run :func:`resolve_all` in a thread.
"""

from __future__ import annotations

import ipaddress
import socket


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
