"""Where the pool comes from: static entries, DNS names re-resolved, a watched file, the admin API.

Every entry is ``HOST:PORT``. A name resolves to every address it has (a Kubernetes headless
Service name gives every router pod) and is resolved again every ``--dns-refresh-secs``; the header
always carries an ``IP:PORT`` literal, the only form ORIGINAL_DST accepts. ``--upstreams-file`` is a
YAML or JSON list of entries, re-read when it changes. The admin API's SetUpstreams replaces the
configured entries until the next configuration reload. A name that fails to resolve keeps the
addresses it had, so a DNS hiccup never empties the pool.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os

import yaml

from . import logs
from . import metrics
from .addresses import AddressError, AddressPolicy, parse_hostport, resolve_all
from .config import Config
from .director import Director

log = logs.get("prefix_router.discovery")


def read_upstreams_file(path: str) -> list[str]:
    """A YAML (or JSON, which YAML reads) list of HOST:PORT entries; raises AddressError."""
    try:
        with open(path, "rb") as f:
            data = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as exc:
        raise AddressError(f"--upstreams-file {path!r}: {exc}") from None
    if data is None:
        return []
    if isinstance(data, dict) and "upstreams" in data:
        data = data["upstreams"]
    if not isinstance(data, list) or not all(isinstance(x, str) for x in data):
        raise AddressError(f"--upstreams-file {path!r}: must be a list of HOST:PORT strings")
    for entry in data:
        parse_hostport(entry)
    return data


def _is_literal(entry: str) -> bool:
    host, _ = parse_hostport(entry)
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


class Discovery:
    """Keeps the director's pool equal to the resolved configured entries."""

    def __init__(self, director: Director, cfg: Config) -> None:
        self.director = director
        self.cfg = cfg
        self.policy = AddressPolicy(cfg.allowed_upstream_cidrs)
        self.override: list[str] | None = None
        self._known: dict[str, list[str]] = {}
        self._file_mtime: float | None = None

    def reconfigure(self, cfg: Config) -> None:
        self.cfg = cfg
        self.policy = AddressPolicy(cfg.allowed_upstream_cidrs)

    def entries(self) -> list[str]:
        """The configured entries: the admin override, else flags/env/config plus the file."""
        if self.override is not None:
            return list(self.override)
        cfg = self.cfg
        entries = list(cfg.upstreams)
        if cfg.upstreams_file:
            try:
                entries += read_upstreams_file(cfg.upstreams_file)
            except AddressError as exc:
                log.error("upstreams_file_unreadable", error=str(exc))
                entries += self._known.get("\0file", [])
            else:
                self._known["\0file"] = entries[len(cfg.upstreams):]
        return entries

    def resolve(self, entries: list[str]) -> list[str]:
        addresses: list[str] = []
        for entry in entries:
            try:
                found = resolve_all(entry)
                self._known[entry] = found
            except AddressError as exc:
                found = self._known.get(entry, [])
                log.warning("resolve_failed", entry=entry, error=str(exc), keeping=found)
            for a in found:
                why = self.policy.refusal(a)
                if why is not None:
                    metrics.UPSTREAMS_REFUSED.inc()
                    log.error("upstream_refused", entry=entry, address=a, reason=why)
                elif a not in addresses:
                    addresses.append(a)
        return addresses

    def refusals(self, entries: list[str]) -> list[str]:
        """Why each literal ``IP:PORT`` among ``entries`` may not be an upstream (names are
        checked once resolved)."""
        out = []
        for e in entries:
            try:
                literals = resolve_all(e) if _is_literal(e) else []
            except AddressError as exc:
                out.append(str(exc))
                continue
            out += [w for w in map(self.policy.refusal, literals) if w]
        return out

    def apply(self, addresses: list[str]) -> None:
        added, removed = self.director.set_upstreams(addresses)
        if added or removed:
            log.info("pool_changed", upstreams=addresses, added=added, removed=removed)

    async def refresh(self) -> list[str]:
        """Resolve the configured entries and apply them (at start, on reloads, periodically).
        getaddrinfo and the file read block: they run in a thread, so decisions never wait."""
        addresses = await asyncio.to_thread(lambda: self.resolve(self.entries()))
        if addresses:
            self.apply(addresses)
        else:
            log.error("no_upstream_resolved", keeping=self.director.addresses())
        return addresses

    def file_changed(self) -> bool:
        path = self.cfg.upstreams_file
        try:
            mtime = os.stat(path).st_mtime if path else None
        except OSError:
            mtime = None
        changed = mtime != self._file_mtime
        self._file_mtime = mtime
        return changed

    async def run(self) -> None:
        """Re-resolve every ``dns_refresh_secs``; re-read the file within a second of a change."""
        since = 0.0
        self.file_changed()
        while True:
            await asyncio.sleep(1.0)
            since += 1.0
            if since >= self.cfg.dns_refresh_secs or self.file_changed():
                since = 0.0
                await self.refresh()
