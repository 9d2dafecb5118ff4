"""Active health checks of the upstreams: ``GET /health`` on each SGLang router, every interval.

N failures in a row take an upstream out, M successes bring it back (sglang-router's flag names
and defaults for N, M and the timeout). Passive ejection, from failures seen on real traffic, lives
in the director; together they keep new requests off a dead router within one interval.
"""

from __future__ import annotations

import asyncio

import aiohttp

from . import logs, metrics
from .director import Director

log = logs.get("prefix_router.health")


class HealthChecker:
    def __init__(self, director: Director) -> None:
        self.director = director

    async def check(self, session: aiohttp.ClientSession, address: str) -> bool:
        cfg = self.director.cfg
        try:
            async with session.get(f"http://{address}{cfg.health_check_endpoint}", timeout=aiohttp.ClientTimeout(total=cfg.health_check_timeout_secs)) as r:
                return 200 <= r.status < 300
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
            return False

    async def run_once(self, session: aiohttp.ClientSession) -> None:
        cfg = self.director.cfg
        pool = self.director.pool
        addresses = list(pool.upstreams)
        results = await asyncio.gather(*(self.check(session, a) for a in addresses))
        for address, ok in zip(addresses, results):
            if not ok:
                metrics.HEALTH_CHECK_FAILURES.labels(address).inc()
            changed = pool.record_check(address, ok, cfg.health_failure_threshold, cfg.health_success_threshold)
            if changed is not None:
                log.warning("upstream_health", upstream=address, healthy=changed)

    async def run(self) -> None:
        # One connection per check: a pooled keep-alive connection would hide a router that
        # stopped accepting new connections.
        connector = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(connector=connector) as session:
            while True:
                await self.run_once(session)
                await asyncio.sleep(self.director.cfg.health_interval_secs)
