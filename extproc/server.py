"""The running service: its listeners, its background tasks, its shutdown.

- gRPC on ``--grpc-listen`` (faces Envoy; TLS with client certificates when configured):
  ext_proc, the access-log receiver, grpc.health.v1, reflection only when asked for.
- HTTP on ``--admin-listen`` (127.0.0.1): the status page, /metrics, /healthz, /readyz.
- gRPC on ``--admin-grpc-listen`` (127.0.0.1): the project's admin API (protos/), only with a token.
- Tasks: tree eviction, in-flight expiry, active health checks, upstream discovery, reloads, and
  with ``--sync-url`` the sync link to the other replicas (:mod:`extproc.sync`).

Shutdown on SIGTERM/SIGINT: health turns NOT_SERVING and the service keeps serving for
``shutdown_delay_secs`` (Envoy's health check moves new streams away), then stops accepting; streams
in flight get ``drain_timeout_secs`` to finish, and the process exits 0.
"""

from __future__ import annotations

import asyncio
import os
import signal
from typing import Callable

import grpc
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc
from envoy.service.ext_proc.v3 import external_processor_pb2, external_processor_pb2_grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from . import logs, metrics
from .admin import Admin
from .adminapi import AdminApi, TokenCheck, add_admin_api, read_token
from .als import AccessLogReceiver
from .config import Config, ConfigError
from .director import Director
from .discovery import Discovery
from .handlers import ExternalProcessor
from .health import HealthChecker
from .sync import SyncLink
from .addresses import AddressError

log = logs.get("prefix_router.server")

EXT_PROC_SERVICE = external_processor_pb2.DESCRIPTOR.services_by_name["ExternalProcessor"].full_name
ALS_SERVICE = als_pb2.DESCRIPTOR.services_by_name["AccessLogService"].full_name
HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
CONFIG_POLL_SECS = 1.0
# Envoy checks the service every second; three missed checks in a row mean it is gone.
ENVOY_SILENCE_SECS = 3.0
_GRPC_OPTIONS = [
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
]


class EnvoyWatch(health.aio.HealthServicer):
    """grpc.health.v1, noting who checks: Envoy checks the service every second (shipped configs).

    A peer that checked and then falls silent for ``ENVOY_SILENCE_SECS`` is gone (crashed,
    restarted elsewhere, cut off): the reports of requests it was carrying will never come, so the
    director is told, as when an access-log stream ends. This covers an Envoy that had not opened
    its access-log stream yet (it does so at the first finished request).
    """

    def __init__(self, director: Director) -> None:
        super().__init__()
        self.director = director
        self.last_seen: dict[str, float] = {}  # peer host -> when it last checked
        self.silent: set[str] = set()

    async def Check(self, request, context):  # noqa: N802 - gRPC method name
        host = context.peer().rsplit(":", 1)[0]
        self.last_seen[host] = asyncio.get_running_loop().time()
        self.silent.discard(host)
        return await super().Check(request, context)

    def look_for_silence(self) -> None:
        now = asyncio.get_running_loop().time()
        for host, seen in self.last_seen.items():
            if now - seen > ENVOY_SILENCE_SECS and host not in self.silent:
                self.silent.add(host)
                log.warning("envoy_silent", peer=host, seconds=round(now - seen, 1))
                self.director.reports_lost()


def _server_credentials(cfg: Config) -> grpc.ServerCredentials | None:
    """TLS for the gRPC port when configured; with a client CA, a client certificate signed by it
    is required: only Envoy, holding such a certificate, may open streams. Raises OSError."""
    if not cfg.grpc_tls_cert:
        return None
    read = lambda p: open(p, "rb").read()  # noqa: E731
    try:
        chain, key = read(cfg.grpc_tls_cert), read(cfg.grpc_tls_key)
        ca = read(cfg.grpc_tls_client_ca) if cfg.grpc_tls_client_ca else None
    except OSError as exc:
        raise OSError(f"--grpc-tls-*: cannot read {exc.filename}: {exc.strerror}") from None
    return grpc.ssl_server_credentials([(key, chain)], root_certificates=ca, require_client_auth=ca is not None)


async def _every(interval: float | Callable[[], float], fn: Callable[[], object]) -> None:
    """Call ``fn`` forever, ``interval`` seconds apart (a callable interval is re-read each time)."""
    while True:
        await asyncio.sleep(interval() if callable(interval) else interval)
        fn()


class Service:
    """Everything one ``prefix-router serve`` process runs."""

    def __init__(self, cfg: Config, reload: Callable[[], Config] | None = None) -> None:
        self.cfg = cfg
        self.director = Director(cfg)
        self.discovery = Discovery(self.director, cfg)
        self.checker = HealthChecker(self.director, cfg)
        self.reload_source = reload
        self.receiver = AccessLogReceiver(self.director)
        self.health = EnvoyWatch(self.director)
        self.sync = SyncLink(self.director, cfg) if cfg.sync_url else None
        self.admin = Admin(self.director, lambda: self.cfg, self.sync.state if self.sync is not None else None)
        self.grpc: grpc.aio.Server | None = None
        self.admin_grpc: grpc.aio.Server | None = None
        self.ports: dict[str, int] = {}
        self._tasks: list[asyncio.Task] = []
        self._config_applied: tuple[int, int] | None = None  # (mtime_ns, size) of the file in force
        self._config_pending: tuple[int, int] | None = None  # a change seen once, not yet settled

    # -- start -----------------------------------------------------------------------------------

    async def start(self) -> None:
        """Resolve the pool, bind every listener, start the background tasks. Raises AddressError
        when no upstream resolves and OSError when a listener cannot bind."""
        await self.discovery.refresh()
        if not self.director.addresses():
            raise AddressError("no upstream: give --upstream or --upstreams-file")
        cfg = self.cfg
        self.grpc = grpc.aio.server(options=_GRPC_OPTIONS)
        external_processor_pb2_grpc.add_ExternalProcessorServicer_to_server(ExternalProcessor(self.director), self.grpc)
        als_pb2_grpc.add_AccessLogServiceServicer_to_server(self.receiver, self.grpc)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        if cfg.grpc_reflection:
            reflection.enable_server_reflection((EXT_PROC_SERVICE, ALS_SERVICE, HEALTH_SERVICE, reflection.SERVICE_NAME), self.grpc)
        self.ports["grpc"] = self._bind(self.grpc, cfg.grpc_listen, "--grpc-listen", _server_credentials(cfg))
        if cfg.admin_token_file:
            self.admin_grpc = grpc.aio.server(interceptors=[TokenCheck(read_token(cfg.admin_token_file))])
            add_admin_api(AdminApi(self.director, self.discovery, lambda: self.cfg), self.admin_grpc)
            self.ports["admin_grpc"] = self._bind(self.admin_grpc, cfg.admin_grpc_listen, "--admin-grpc-listen")
        else:
            log.info("admin_api_off", reason="no --admin-token-file")
        await self.grpc.start()
        if self.admin_grpc is not None:
            await self.admin_grpc.start()
        self.ports["admin"] = await self.admin.start(cfg.admin_listen)
        for name in ("", EXT_PROC_SERVICE, ALS_SERVICE):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        metrics.register_state(self.director.upstreams)
        if self.sync is not None:
            await self.sync.start()
        self._config_applied = self._config_signature()
        self._tasks = [
            asyncio.create_task(self._evict_forever()),
            # Expiring lost in-flight entries must not wait a full eviction interval.
            asyncio.create_task(_every(1.0, self.director.expire)),
            asyncio.create_task(_every(1.0, self.health.look_for_silence)),
            asyncio.create_task(self.checker.run()),
            asyncio.create_task(self.discovery.run()),
        ]
        if self.reload_source is not None:
            self._tasks.append(asyncio.create_task(self._poll_config_forever()))

    async def _evict_forever(self) -> None:
        """Sweep every ``eviction_interval_secs``, or at once when an upstream reaches its budget."""
        wake = asyncio.Event()
        self.director.wake_sweeper = wake.set
        while True:
            try:
                await asyncio.wait_for(wake.wait(), self.cfg.eviction_interval_secs)
            except asyncio.TimeoutError:
                pass
            wake.clear()
            for _ in self.director.evict_slices():
                await asyncio.sleep(0)  # let decisions run between slices

    @staticmethod
    def _bind(server: grpc.aio.Server, listen: str, flag: str, credentials: grpc.ServerCredentials | None = None) -> int:
        try:
            port = server.add_insecure_port(listen) if credentials is None else server.add_secure_port(listen, credentials)
        except RuntimeError as exc:
            raise OSError(f"{flag}: cannot listen on {listen} ({exc})") from None
        if port == 0:
            raise OSError(f"{flag}: cannot listen on {listen}")
        return port

    # -- reload ----------------------------------------------------------------------------------

    async def reload(self) -> bool:
        """Re-read flags/env/file: thresholds and the pool change; the tree and in-flight stay.

        Atomic: the whole new configuration is read and validated (in a thread: it reads a file)
        before anything changes, and a bad one changes nothing. An admin override of the upstreams
        (SetUpstreams) survives a reload that leaves the configured upstreams as they were; a
        reload that changes them replaces it.
        """
        if self.reload_source is None:
            return False
        try:
            new = await asyncio.to_thread(self.reload_source)
            if not new.upstreams and not new.upstreams_file:
                raise ConfigError("--upstream: the new configuration has no upstream")
        except ConfigError as exc:
            metrics.RELOADS.labels("failed").inc()
            log.error("reload_failed", error=str(exc))
            return False
        old = self.cfg
        for key in Config.FIXED:
            if getattr(new, key) != getattr(old, key):
                log.warning("reload_ignores", setting=key, running=getattr(old, key), configured=getattr(new, key))
        if self.discovery.override is not None and (new.upstreams, new.upstreams_file) != (old.upstreams, old.upstreams_file):
            log.warning("admin_override_replaced", override=self.discovery.override, configured=list(new.upstreams))
            self.discovery.override = None
        self.cfg = new
        for part in (self.director, self.discovery, self.checker, self.sync):
            if part is not None:
                part.reconfigure(new)
        await self.discovery.refresh()
        metrics.RELOADS.labels("ok").inc()
        log.info("reloaded", upstreams=self.director.addresses())
        return True

    def _config_signature(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self.cfg.config) if self.cfg.config else None
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size) if st else None

    async def poll_config(self) -> None:
        """Reload once the config file has changed and then stayed the same for a whole poll: a
        file caught half-written (an editor saving in place, a copy in progress) is never applied."""
        sig = self._config_signature()
        if sig == self._config_applied:
            self._config_pending = None
            return
        if sig != self._config_pending:
            self._config_pending = sig  # changed since the last look: let it settle
            return
        self._config_applied, self._config_pending = sig, None
        if sig is not None:
            await self.reload()

    async def _poll_config_forever(self) -> None:
        while True:
            await asyncio.sleep(CONFIG_POLL_SECS)
            await self.poll_config()

    # -- stop ------------------------------------------------------------------------------------

    async def stop(self, delay: float | None = None) -> None:
        cfg = self.cfg
        self.admin.draining = True
        log.info("draining", delay_secs=cfg.shutdown_delay_secs, timeout_secs=cfg.drain_timeout_secs)
        for name in ("", EXT_PROC_SERVICE, ALS_SERVICE):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        # Keep answering while Envoy's health check notices; a stream refused mid-body in duplex
        # mode could not fail open.
        await asyncio.sleep(cfg.shutdown_delay_secs if delay is None else delay)
        for t in self._tasks:
            t.cancel()
        self.receiver.close()
        if self.grpc is not None:
            await self.grpc.stop(grace=cfg.drain_timeout_secs)
        if self.admin_grpc is not None:
            await self.admin_grpc.stop(grace=1.0)
        if self.sync is not None:  # after the streams: their last finish reports still go out
            await self.sync.send()
            await self.sync.stop()
        await self.admin.stop()
        log.info("stopped")


async def serve(cfg: Config, reload: Callable[[], Config] | None = None) -> int:
    """Run until SIGTERM/SIGINT; returns the exit status."""
    service = Service(cfg, reload)
    await service.start()
    log.info("serving", ports=service.ports, upstreams=service.director.addresses(), routing_text=cfg.routing_text)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(service.reload()))
    await stop.wait()
    await service.stop()
    return 0
