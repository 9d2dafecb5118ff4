"""Active health checks of the upstreams: ``GET /health`` on each SGLang router, every interval.

N failures in a row take an upstream out, M successes bring it back (sglang-router's flag names
and defaults for N, M and the timeout; the state machine is :mod:`extproc.upstream`). Passive
ejection, from failures seen on real traffic, comes through the director's access-log path.
"""

from __future__ import annotations

import asyncio

import aiohttp

from . import logs, metrics
from .config import Config
from .director import Director

log = logs.get("prefix_router.health")

# How soon a watcher starts for an upstream that joined the pool.
POOL_POLL_SECS = 0.5


class HealthChecker:
    def __init__(self, director: Director, cfg: Config) -> None:
        self.director = director
        self.cfg = cfg

    def reconfigure(self, cfg: Config) -> None:
        self.cfg = cfg

    async def check(self, session: aiohttp.ClientSession, address: str) -> bool:
        cfg = self.cfg
        try:
            async with session.get(f"http://{address}{cfg.health_check_endpoint}", timeout=aiohttp.ClientTimeout(total=cfg.health_check_timeout_secs)) as r:
                return 200 <= r.status < 300
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
            return False

    async def check_and_record(self, session: aiohttp.ClientSession, address: str) -> None:
        ok = await self.check(session, address)
        if not ok:
            metrics.HEALTH_CHECK_FAILURES.labels(address).inc()
        changed = self.director.record_check(address, ok)
        if changed is not None:
            log.warning("upstream_health", upstream=address, healthy=changed)

    async def _watch(self, session: aiohttp.ClientSession, address: str) -> None:
        """One upstream's checks, on its own clock: a check that hangs until its timeout delays
        only this upstream's next check, never another's."""
        while True:
            started = asyncio.get_running_loop().time()
            await self.check_and_record(session, address)
            elapsed = asyncio.get_running_loop().time() - started
            await asyncio.sleep(max(0.0, self.cfg.health_interval_secs - elapsed))

    async def run(self) -> None:
        """A watcher per upstream, started and stopped as the pool changes. A router that hangs is
        out within ``health_failure_threshold`` checks of at most ``health_check_timeout_secs``
        each, started ``health_interval_secs`` apart (README: 3 x 5 s with the defaults)."""
        # One connection per check: a pooled keep-alive connection would hide a router that
        # stopped accepting new connections.
        connector = aiohttp.TCPConnector(force_close=True)
        watchers: dict[str, asyncio.Task] = {}
        async with aiohttp.ClientSession(connector=connector) as session:
            try:
                while True:
                    current = set(self.director.addresses())
                    for address in current - watchers.keys():
                        watchers[address] = asyncio.create_task(self._watch(session, address))
                    for address in watchers.keys() - current:
                        watchers.pop(address).cancel()
                    await asyncio.sleep(POOL_POLL_SECS)
            finally:
                for task in watchers.values():
                    task.cancel()
