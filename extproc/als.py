"""Envoy's gRPC access-log service, used as the "request finished" signal for in-flight counts.

Envoy closes the ext_proc stream when it expects no more messages, which is long before a
streamed LLM response ends; piping every response chunk through ext_proc would add a round trip per
token. Envoy's access log instead fires exactly once per request, after the response (or reset),
and is streamed here in batches off the request path. Each entry carries the ticket header the
service set on the request, which releases that request's in-flight count. Only the ticket acts: an
entry with a ticket this service does not hold changes nothing.
"""

from __future__ import annotations

import asyncio
from typing import AsyncIterator

import grpc
from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc

from . import logs, metrics
from .director import TICKET_HEADER, Director, Outcome

log = logs.get("prefix_router.als")


# What Envoy reports about a request, by whose doing it failed.
#  - The router's: it refused or broke the connection, reset the stream, or left it idle past the
#    route's per-try idle timeout.
_ROUTER_FAULTS = ("upstream_connection_failure", "upstream_connection_termination", "upstream_remote_reset",
                  "upstream_request_timeout", "upstream_protocol_error")
#  - Envoy's own or the client's: Envoy's circuit breakers overflowed or it reset the stream itself,
#    nothing was healthy, a limit or fault filter answered, the client went away. A 503 Envoy made
#    up for such a reason says nothing about the router and must never eject it.
_NOT_THE_ROUTER = ("local_reset", "upstream_overflow", "no_healthy_upstream", "no_route_found", "rate_limited",
                   "downstream_connection_termination", "downstream_remote_reset", "downstream_protocol_error",
                   "overload_manager", "fault_injected", "delay_injected", "failed_local_healthcheck", "no_cluster_found",
                   "invalid_envoy_request_headers", "rate_limit_service_error",
                   "no_filter_config_found", "response_from_cache_filter", "dns_resolution_failure", "duration_timeout",
                   "stream_idle_timeout", "upstream_retry_limit_exceeded", "upstream_max_stream_duration_reached")
# With no flag at all, these codes came from the router itself (its workers are gone, it is overloaded).
_GATEWAY_ERRORS = frozenset((502, 503, 504))


def upstream_failed(entry: accesslog_pb2.HTTPAccessLogEntry) -> Outcome:
    """How this request went for the router: fine, failed by the router's doing, or refused
    outright (nothing listens: the router is down). Envoy's own and the client's doings are fine."""
    f = entry.common_properties.response_flags
    if f.ListFields():  # any flag at all? (nearly every request has none: one C call, not 27 lookups)
        if any(getattr(f, name) for name in _NOT_THE_ROUTER) or f.HasField("unauthorized_details"):
            return Outcome.OK
        if f.upstream_connection_failure:
            return Outcome.REFUSED
        if any(getattr(f, name) for name in _ROUTER_FAULTS):
            return Outcome.FAILED
    return Outcome.FAILED if entry.response.response_code.value in _GATEWAY_ERRORS else Outcome.OK


class AccessLogReceiver(als_pb2_grpc.AccessLogServiceServicer):
    """Releases in-flight counts as Envoy reports finished requests.

    Envoy keeps one access-log stream open for as long as the service lives, so a graceful stop
    must end these streams itself (:meth:`close`), or the drain would wait out its whole timeout.
    Envoy reopens the stream to whichever replica is serving.
    """

    def __init__(self, director: Director) -> None:
        self.director = director
        self._closing = asyncio.Event()

    def close(self) -> None:
        self._closing.set()

    async def StreamAccessLogs(  # noqa: N802 - gRPC method name
        self, request_iterator: AsyncIterator[als_pb2.StreamAccessLogsMessage], context: grpc.aio.ServicerContext
    ) -> als_pb2.StreamAccessLogsResponse:
        consumer = asyncio.ensure_future(self._consume(request_iterator))
        closing = asyncio.ensure_future(self._closing.wait())
        try:
            await asyncio.wait((consumer, closing), return_when=asyncio.FIRST_COMPLETED)
        finally:
            closing.cancel()
            if not consumer.done():
                consumer.cancel()
            if not self._closing.is_set():  # Envoy's side ended it: what it held back is lost
                self.director.reports_lost()
        if consumer.done() and not consumer.cancelled() and consumer.exception() is not None:
            metrics.STREAM_ERRORS.labels("UNKNOWN").inc()
            log.error("access_log_stream_failed", error=repr(consumer.exception()))
        return als_pb2.StreamAccessLogsResponse()

    async def _consume(self, request_iterator: AsyncIterator[als_pb2.StreamAccessLogsMessage]) -> None:
        finished = self.director.finished
        async for msg in request_iterator:
            if not msg.HasField("http_logs"):
                continue
            for entry in msg.http_logs.log_entry:
                ticket = entry.request.request_headers.get(TICKET_HEADER)
                if ticket:
                    finished(ticket, upstream_failed(entry))
