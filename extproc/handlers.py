"""ext_proc mechanics: Envoy's ProcessingRequest stream in, ProcessingResponses out.

Two body modes are served, told apart by the ``protocol_config`` Envoy sends on the first message:

- ``BUFFERED``: answer the headers with CONTINUE, then put the decision (header mutation plus
  ``clear_route_cache``) in the answer to the whole buffered body.
- ``FULL_DUPLEX_STREAMED``: answer nothing until the body's end of stream, then the headers response
  with the decision, then the body back unchanged in chunks of at most ``CHUNK`` bytes.

Requests without a body (``end_of_stream`` on the headers) are decided on the headers. Everything
about *what* to route lives in the director; this module only speaks the protocol.
"""

from __future__ import annotations

import asyncio
from typing import AsyncIterator

import grpc
import orjson
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from envoy.type.v3 import http_status_pb2

from . import logs, metrics
from .director import Director, RequestInfo, Routed

log = logs.get("prefix_router.handlers")

# Envoy's gRPC messages default to a 4 MiB limit; ~62 KB chunks keep each well under it.
CHUNK = 62 * 1024
TICKET_HEADER = "x-prefix-router-ticket"

_BODY_MODE = processing_mode_pb2.ProcessingMode.BodySendMode
_DUPLEX = _BODY_MODE.Value("FULL_DUPLEX_STREAMED")
_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
_CONTINUE_HEADERS = pb.ProcessingResponse(request_headers=pb.HeadersResponse())


def headers_dict(msg: pb.HttpHeaders) -> dict[str, str]:
    """Envoy sends header values as ``raw_value`` bytes (newer) or ``value`` (older)."""
    out = {}
    for h in msg.headers.headers:
        out[h.key] = h.raw_value.decode("utf-8", "replace") if h.raw_value else h.value
    return out


def decision_mutation(header_name: str, routed: Routed, ticket: str) -> pb.CommonResponse:
    return pb.CommonResponse(
        header_mutation=pb.HeaderMutation(
            set_headers=[
                base_pb2.HeaderValueOption(
                    header=base_pb2.HeaderValue(key=header_name, raw_value=routed.address.encode()),
                    append_action=_OVERWRITE,
                ),
                base_pb2.HeaderValueOption(
                    header=base_pb2.HeaderValue(key=TICKET_HEADER, raw_value=ticket.encode()),
                    append_action=_OVERWRITE,
                ),
            ]
        ),
        clear_route_cache=True,
    )


_UNAVAILABLE_BODY = orjson.dumps(
    {
        "error": {
            "message": "no healthy upstream is available to serve this request",
            "type": "service_unavailable",
            "code": 503,
        }
    }
)


def unavailable() -> pb.ProcessingResponse:
    """The OpenAI-style 503 sent when no upstream is healthy."""
    return pb.ProcessingResponse(
        immediate_response=pb.ImmediateResponse(
            status=http_status_pb2.HttpStatus(code=http_status_pb2.ServiceUnavailable),
            headers=pb.HeaderMutation(
                set_headers=[
                    base_pb2.HeaderValueOption(
                        header=base_pb2.HeaderValue(key="content-type", raw_value=b"application/json"),
                        append_action=_OVERWRITE,
                    )
                ]
            ),
            body=_UNAVAILABLE_BODY,
            details="prefix_router_no_healthy_upstream",
        )
    )


class ExternalProcessor(pb_grpc.ExternalProcessorServicer):
    """``envoy.service.ext_proc.v3.ExternalProcessor/Process`` over a :class:`Director`."""

    def __init__(self, director: Director, header_name: str) -> None:
        self.director = director
        self.header_name = header_name

    async def Process(  # noqa: N802 - gRPC method name
        self, request_iterator: AsyncIterator[pb.ProcessingRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ProcessingResponse]:
        director = self.director
        info: RequestInfo | None = None
        delivered = False
        duplex = False
        chunks: list[bytes] = []
        size = 0
        too_large = False
        try:
            async for req in request_iterator:
                kind = req.WhichOneof("request")
                if kind == "request_headers":
                    if req.HasField("protocol_config"):
                        duplex = req.protocol_config.request_body_mode == _DUPLEX
                    info = director.begin(headers_dict(req.request_headers))
                    if req.request_headers.end_of_stream:
                        routed = director.route(info, None)
                        yield self._answer("headers", routed, info)
                        delivered = True
                    elif not duplex:
                        yield _CONTINUE_HEADERS
                elif kind == "request_body":
                    if info is None:  # a body before headers breaks the protocol
                        metrics.STREAM_ERRORS.labels("INVALID_ARGUMENT").inc()
                        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "request_body before request_headers")
                        return
                    body = req.request_body
                    if delivered:  # a decision already went out: pass the rest through
                        if duplex:
                            for r in _body_chunks([body.body], body.end_of_stream):
                                yield r
                        else:
                            yield pb.ProcessingResponse(request_body=pb.BodyResponse())
                        continue
                    if not duplex:
                        routed = director.route(info, body.body)
                        yield self._answer("body", routed, info)
                        delivered = True
                        continue
                    chunks.append(body.body)
                    size += len(body.body)
                    too_large = too_large or size > director.cfg.max_body_bytes
                    # Past the parse cap the body cannot be routed on: decide now and stream the
                    # rest through instead of holding an unbounded body in memory.
                    if body.end_of_stream or too_large:
                        async for r in self._finish_duplex(info, chunks, too_large, end_of_stream=body.end_of_stream):
                            yield r
                        delivered = True
                        chunks = []
                elif kind == "request_trailers":
                    if info is not None and duplex and not delivered:
                        async for r in self._finish_duplex(info, chunks, too_large, end_of_stream=False):
                            yield r
                        delivered = True
                        chunks = []
                    yield pb.ProcessingResponse(request_trailers=pb.TrailersResponse())
                elif kind == "response_headers":
                    yield pb.ProcessingResponse(response_headers=pb.HeadersResponse())
                elif kind == "response_body":
                    yield pb.ProcessingResponse(response_body=pb.BodyResponse())
                elif kind == "response_trailers":
                    yield pb.ProcessingResponse(response_trailers=pb.TrailersResponse())
        except asyncio.CancelledError:
            metrics.STREAM_ERRORS.labels("CANCELLED").inc()
            raise
        except Exception:
            metrics.STREAM_ERRORS.labels("INTERNAL").inc()
            log.exception("stream_failed", request_id=info.request_id if info else "")
            raise
        finally:
            if info is not None and not delivered:
                director.abandoned(info)

    async def _finish_duplex(
        self, info: RequestInfo, chunks: list[bytes], too_large: bool, *, end_of_stream: bool
    ) -> AsyncIterator[pb.ProcessingResponse]:
        body = b"".join(chunks) if not too_large else None
        routed = self.director.route(info, body, body_too_large=too_large)
        yield self._answer("headers", routed, info)
        if routed.address is None:
            return
        for r in _body_chunks(chunks, end_of_stream):
            yield r

    def _answer(self, phase: str, routed: Routed, info: RequestInfo) -> pb.ProcessingResponse:
        """The decision as the answer to ``phase`` (request headers or request body), or the 503."""
        if routed.address is None:
            return unavailable()
        common = decision_mutation(self.header_name, routed, info.ticket)
        if phase == "headers":
            return pb.ProcessingResponse(request_headers=pb.HeadersResponse(response=common))
        return pb.ProcessingResponse(request_body=pb.BodyResponse(response=common))


def _body_chunks(chunks: list[bytes], end_of_stream: bool) -> list[pb.ProcessingResponse]:
    """The held body streamed back unchanged, re-cut into chunks of at most ``CHUNK`` bytes."""
    data = b"".join(chunks)
    pieces = [data[i : i + CHUNK] for i in range(0, len(data), CHUNK)] or ([b""] if end_of_stream else [])
    last = len(pieces) - 1
    return [
        pb.ProcessingResponse(
            request_body=pb.BodyResponse(
                response=pb.CommonResponse(
                    body_mutation=pb.BodyMutation(
                        streamed_response=pb.StreamedBodyResponse(body=p, end_of_stream=end_of_stream and i == last)
                    )
                )
            )
        )
        for i, p in enumerate(pieces)
    ]
