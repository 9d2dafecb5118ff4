"""Active health checks of the upstreams: ``GET /health`` on each SGLang router, every interval,
then (``--workers-endpoint``) ``GET /workers`` for how many healthy workers it balances.

N failures in a row take an upstream out, M successes bring it back (sglang-router's flag names
and defaults for N, M and the timeout; the state machine is :mod:`extproc.upstream`). Passive
ejection, from failures seen on real traffic, comes through the director's access-log path. The
worker count sets the policy's continuation knee for that upstream (``policy.knee``): a router of W
workers runs W decode batches.
"""

from __future__ import annotations

import asyncio

import aiohttp

from . import logs, metrics
from .config import Config
from .director import Director
from .upstream import healthy_workers

log = logs.get("prefix_router.health")

# How soon a watcher starts for an upstream that joined the pool.
POOL_POLL_SECS = 0.5
# The largest worker list read: about 400 bytes a worker in sglang-router 0.3.2's answer, so
# thousands of workers; a larger answer is refused, never held in memory.
MAX_WORKERS_BODY = 1 << 20


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

    async def read_workers(self, session: aiohttp.ClientSession, address: str) -> tuple[int | None, str]:
        """The healthy workers the upstream reports, or ``None`` and why not: ``unreachable`` (no
        answer: the caller keeps what it knew), ``status``, ``too_large`` or ``bad_body`` (an
        answer without a count: the upstream counts as one worker)."""
        cfg = self.cfg
        try:
            timeout = aiohttp.ClientTimeout(total=cfg.health_check_timeout_secs)
            async with session.get(f"http://{address}{cfg.workers_endpoint}", timeout=timeout) as r:
                if not 200 <= r.status < 300:
                    return None, "status"
                if (r.content_length or 0) > MAX_WORKERS_BODY:
                    return None, "too_large"
                body = bytearray()
                async for chunk in r.content.iter_chunked(1 << 16):
                    body += chunk
                    if len(body) > MAX_WORKERS_BODY:
                        return None, "too_large"
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
            return None, "unreachable"
        n = healthy_workers(bytes(body))
        return n, "" if n is not None else "bad_body"

    async def record_workers(self, session: aiohttp.ClientSession, address: str) -> None:
        n, why = await self.read_workers(session, address)
        if why:
            metrics.WORKERS_READ_FAILURES.labels(address, why).inc()
            if why == "unreachable":
                return
        if self.director.record_workers(address, n):
            log.info("upstream_workers", upstream=address, workers=n, reason=why or None)

    async def check_and_record(self, session: aiohttp.ClientSession, address: str) -> None:
        ok = await self.check(session, address)
        if not ok:
            metrics.HEALTH_CHECK_FAILURES.labels(address).inc()
        changed = self.director.record_check(address, ok)
        if changed is not None:
            log.warning("upstream_health", upstream=address, healthy=changed)
        if ok and self.cfg.workers_endpoint:
            await self.record_workers(session, address)
        elif ok:
            self.director.record_workers(address, None)  # turned off by a reload: one worker each

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
