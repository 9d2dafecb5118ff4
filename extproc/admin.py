"""The admin HTTP listener: the status page (``/``, ``/status.json``), ``/metrics`` (Prometheus),
``/healthz`` (alive), ``/readyz`` (ready).

Separate from the gRPC port so that it can stay on 127.0.0.1 (the default) while the gRPC port
faces Envoy. Ready means the pool is known and at least one upstream is healthy. The status page
has access rules of its own (:func:`extproc.status.refusal`): /metrics and the probes may be opened
to Prometheus and the kubelet without showing them the configuration.
"""

from __future__ import annotations

import asyncio
import time
from importlib import resources
from typing import Callable

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from . import logs, metrics, status
from .addresses import parse_hostport
from .config import Config
from .director import Director

log = logs.get("prefix_router.admin")

# The page's own files (extproc/static/); nothing is fetched from elsewhere, which the policy enforces.
_STATIC = {
    "/": ("status.html", "text/html"),
    "/status.js": ("status.js", "text/javascript"),
    "/status.css": ("status.css", "text/css"),
}
_PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


class Admin:
    def __init__(
        self,
        director: Director,
        config: Callable[[], Config] | None = None,
        sync_state: Callable[[float], dict] | None = None,
    ) -> None:
        self.director = director
        self.config = config or (lambda: director.cfg)
        self.sync_state = sync_state
        self.draining = False
        self.window = status.DecisionWindow()
        self.started = time.monotonic()
        self._files = {path: (resources.files(__package__).joinpath("static", name).read_bytes(), ctype) for path, (name, ctype) in _STATIC.items()}
        self._runner: web.AppRunner | None = None
        self._sampler: asyncio.Task | None = None
        self.port = 0

    def app(self) -> web.Application:
        app = web.Application()
        for path in _STATIC:
            app.router.add_get(path, self.page)
        app.router.add_get("/status.json", self.status_json)
        app.router.add_get("/favicon.ico", self.no_icon)  # browsers ask; an answer keeps their consoles clean
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        return app

    def _refused(self, request: web.Request) -> web.Response | None:
        reason = status.refusal(self.config(), request.remote, request.headers.get("Host", ""))
        if reason is None:
            return None
        metrics.STATUS_DENIED.labels(reason).inc()
        log.warning("status_denied", reason=reason, peer=request.remote, host=request.headers.get("Host", "")[:100])
        why = "this client is outside --status-allowed-cidrs" if reason == "peer" else "the Host must be an address or localhost"
        return web.Response(status=403, text=f"status page refused: {why}\n", headers=_PAGE_HEADERS)

    async def page(self, request: web.Request) -> web.Response:
        refused = self._refused(request)
        if refused is not None:
            return refused
        body, ctype = self._files[request.path]
        return web.Response(body=body, content_type=ctype, charset="utf-8", headers=_PAGE_HEADERS)

    async def no_icon(self, request: web.Request) -> web.Response:
        return web.Response(status=204)

    async def status_json(self, request: web.Request) -> web.Response:
        refused = self._refused(request)
        if refused is not None:
            return refused
        doc = status.document(self.director, self.config(), self.window, self.sync_state, self.started)
        return web.Response(body=orjson.dumps(doc), content_type="application/json", headers=_PAGE_HEADERS)

    async def _sample_forever(self) -> None:
        while True:
            self.window.sample(time.monotonic(), self.director.decided)
            await asyncio.sleep(status.SAMPLE_SECS)

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
        self._sampler = asyncio.create_task(self._sample_forever())
        return self.port

    async def stop(self) -> None:
        if self._sampler is not None:
            self._sampler.cancel()
        if self._runner is not None:
            await self._runner.cleanup()
