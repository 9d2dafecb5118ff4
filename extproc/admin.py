"""The admin HTTP listener: ``/metrics`` (Prometheus), ``/healthz`` (alive), ``/readyz`` (ready).

Separate from the gRPC port so that it can stay on 127.0.0.1 (the default) while the gRPC port
faces Envoy. Ready means the pool is known and at least one upstream is healthy.
"""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from .director import Director
from .addresses import parse_hostport


class Admin:
    def __init__(self, director: Director) -> None:
        self.director = director
        self.draining = False
        self._runner: web.AppRunner | None = None
        self.port = 0

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        return app

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(REGISTRY), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "alive"})

    async def readyz(self, request: web.Request) -> web.Response:
        ups = self.director.upstreams()
        healthy = sum(1 for u in ups if u.healthy)
        ready = healthy > 0 and not self.draining
        body = {"ready": ready, "upstreams": len(ups), "healthy": healthy, "draining": self.draining}
        return web.json_response(body, status=200 if ready else 503)

    async def start(self, listen: str) -> int:
        host, port = parse_hostport(listen, allow_zero=True)
        self._runner = web.AppRunner(self.app(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        try:
            await site.start()
        except OSError as exc:
            await self._runner.cleanup()
            raise OSError(f"--admin-listen: cannot listen on {listen} ({exc.strerror or exc})") from None
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
