"""The gRPC server: ext_proc, the access-log receiver, grpc.health.v1 and reflection on one port.

Shutdown on SIGTERM/SIGINT: health turns NOT_SERVING and the service keeps serving for
``shutdown_delay_secs`` (Envoy's health check moves new streams away), then stops accepting; streams
in flight get ``drain_timeout_secs`` to finish, and the process exits 0.
"""

from __future__ import annotations

import asyncio
import signal

import grpc
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc
from envoy.service.ext_proc.v3 import external_processor_pb2, external_processor_pb2_grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

import os
from typing import Callable

from . import logs, metrics
from .admin import Admin
from .als import AccessLogReceiver
from .config import Config, ConfigError
from .director import Director
from .handlers import ExternalProcessor
from .health import HealthChecker
from .pool import AddressError, Pool, resolve_upstream

log = logs.get("prefix_router.server")

EXT_PROC_SERVICE = external_processor_pb2.DESCRIPTOR.services_by_name["ExternalProcessor"].full_name
ALS_SERVICE = als_pb2.DESCRIPTOR.services_by_name["AccessLogService"].full_name


def build_director(cfg: Config) -> Director:
    pool = Pool.from_addresses([resolve_upstream(u) for u in cfg.upstreams], cfg.inflight_timeout_secs)
    return Director(cfg, pool)


async def start(cfg: Config, director: Director | None = None) -> tuple[grpc.aio.Server, Director, health.HealthServicer, int]:
    """Build and start the server; returns it with the bound port (useful with port 0)."""
    director = director or build_director(cfg)
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", 64 * 1024 * 1024),
            ("grpc.max_send_message_length", 64 * 1024 * 1024),
        ]
    )
    external_processor_pb2_grpc.add_ExternalProcessorServicer_to_server(ExternalProcessor(director, cfg.header_name), server)
    receiver = AccessLogReceiver(director)
    als_pb2_grpc.add_AccessLogServiceServicer_to_server(receiver, server)
    server.prefix_router_receiver = receiver  # type: ignore[attr-defined]  # closed on drain
    health_servicer = health.aio.HealthServicer() if hasattr(health, "aio") else health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (EXT_PROC_SERVICE, ALS_SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
        server,
    )
    port = server.add_insecure_port(cfg.grpc_listen)
    if port == 0:
        raise OSError(f"cannot listen on {cfg.grpc_listen}")
    await server.start()
    serving = health_pb2.HealthCheckResponse.SERVING
    for name in ("", EXT_PROC_SERVICE, ALS_SERVICE):
        await _set_health(health_servicer, name, serving)
    return server, director, health_servicer, port


async def _set_health(servicer, name: str, status) -> None:
    result = servicer.set(name, status)
    if asyncio.iscoroutine(result):
        await result


async def _every(interval: float | Callable[[], float], fn: Callable[[], object]) -> None:
    """Call ``fn`` forever, ``interval`` seconds apart (a callable interval is re-read each time)."""
    while True:
        await asyncio.sleep(interval() if callable(interval) else interval)
        fn()


def apply_config(director: Director, new: Config) -> None:
    """Take a reloaded configuration: thresholds and the pool change, the tree and in-flight
    requests stay. Raises AddressError (nothing is changed then)."""
    addresses = [resolve_upstream(u) for u in new.upstreams]
    if not addresses:
        raise AddressError("the new configuration has no upstream")
    for key in Config.FIXED:
        if getattr(new, key) != getattr(director.cfg, key):
            log.warning("reload_ignores", setting=key, running=getattr(director.cfg, key), configured=getattr(new, key))
    removed = director.pool.set_addresses(addresses)
    for tenant in removed:
        director.tree.remove_tenant(tenant)
    director.reconfigure(new)
    log.info("reloaded", upstreams=addresses, removed=removed)


class Reloader:
    """SIGHUP, or a change of the config file's modification time, reloads the configuration."""

    def __init__(self, director: Director, load: Callable[[], Config]) -> None:
        self.director = director
        self.load = load
        self._mtime = self._stat()

    def _stat(self) -> float | None:
        path = self.director.cfg.config
        try:
            return os.stat(path).st_mtime if path else None
        except OSError:
            return None

    def reload(self) -> bool:
        try:
            apply_config(self.director, self.load())
        except (ConfigError, AddressError) as exc:
            metrics.RELOADS.labels("failed").inc()
            log.error("reload_failed", error=str(exc))
            return False
        metrics.RELOADS.labels("ok").inc()
        return True

    def poll(self) -> None:
        mtime = self._stat()
        if mtime != self._mtime:
            self._mtime = mtime
            if mtime is not None:
                self.reload()


async def serve(cfg: Config, reload: Callable[[], Config] | None = None) -> int:
    """Run until SIGTERM/SIGINT; returns the exit status."""
    server, director, health_servicer, port = await start(cfg)
    metrics.register_state(director)
    admin = Admin(director)
    admin_port = await admin.start(cfg.admin_listen)
    log.info(
        "serving",
        grpc_listen=cfg.grpc_listen,
        port=port,
        admin_port=admin_port,
        upstreams=list(director.pool.upstreams),
        routing_text=cfg.routing_text,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    tasks = [
        asyncio.create_task(_every(lambda: director.cfg.eviction_interval_secs, director.evict)),
        # Expiring lost in-flight entries must not wait a full eviction interval.
        asyncio.create_task(_every(1.0, director.expire)),
        asyncio.create_task(HealthChecker(director).run()),
    ]
    if reload is not None:
        reloader = Reloader(director, reload)
        loop.add_signal_handler(signal.SIGHUP, reloader.reload)
        tasks.append(asyncio.create_task(_every(1.0, reloader.poll)))
    await stop.wait()
    admin.draining = True
    log.info("draining", delay_secs=cfg.shutdown_delay_secs, timeout_secs=cfg.drain_timeout_secs)
    for name in ("", EXT_PROC_SERVICE, ALS_SERVICE):
        await _set_health(health_servicer, name, health_pb2.HealthCheckResponse.NOT_SERVING)
    # Keep answering while Envoy's health check notices; a stream refused mid-body in duplex mode
    # could not fail open.
    await asyncio.sleep(cfg.shutdown_delay_secs)
    for t in tasks:
        t.cancel()
    server.prefix_router_receiver.close()
    await server.stop(grace=cfg.drain_timeout_secs)
    await admin.stop()
    log.info("stopped")
    return 0
