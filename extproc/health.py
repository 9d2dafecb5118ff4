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

    async def run_once(self, session: aiohttp.ClientSession) -> None:
        addresses = self.director.addresses()
        results = await asyncio.gather(*(self.check(session, a) for a in addresses))
        for address, ok in zip(addresses, results):
            if not ok:
                metrics.HEALTH_CHECK_FAILURES.labels(address).inc()
            changed = self.director.record_check(address, ok)
            if changed is not None:
                log.warning("upstream_health", upstream=address, healthy=changed)

    async def run(self) -> None:
        # One connection per check: a pooled keep-alive connection would hide a router that
        # stopped accepting new connections.
        connector = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(connector=connector) as session:
            while True:
                await self.run_once(session)
                await asyncio.sleep(self.cfg.health_interval_secs)
