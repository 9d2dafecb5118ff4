"""ext_proc mechanics: Envoy's ProcessingRequest stream in, ProcessingResponses out.

Two body modes are served, told apart by the ``protocol_config`` Envoy sends on the first message:

- ``BUFFERED``: answer the headers with CONTINUE, then put the decision (header mutation plus
  ``clear_route_cache``) in the answer to the whole buffered body. For a sample of requests
  (``--observe-sample``) the headers' answer also asks Envoy (``mode_override``) for the response's
  headers and body, streamed: each chunk is answered CONTINUE unchanged, and the usage at its end
  tells the director what the worker reused (:mod:`extproc.usage`).
- ``FULL_DUPLEX_STREAMED``: answer nothing until the body's end of stream, then the headers response
  with the decision, then the body back unchanged in chunks of at most ``CHUNK`` bytes. Envoy
  ignores ``mode_override`` in this mode, so a sampled request's decision carries one more header
  (``x-prefix-router-observe: matched/length``, the tree's prediction) that selects a route on
  which a second ext_proc filter, in observability mode, streams the response to the service
  without waiting for answers: that stream is an :class:`ObserveExchange`, which reads the usage
  at the end. It needs no state from the deciding stream, so any replica can read it.

Requests without a body (``end_of_stream`` on the headers) are decided on the headers. Each stream's
state is one :class:`Exchange` (:class:`BufferedExchange` or :class:`DuplexExchange`), whose methods
take one ext_proc message and return the answers to send; :class:`ExternalProcessor` only moves
messages between gRPC and the exchange. Everything about *what* to route lives in the director.
"""

from __future__ import annotations

from typing import AsyncIterator

import grpc
import orjson
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from envoy.type.v3 import http_status_pb2

from . import logs, metrics, usage
from .director import OBSERVE_HEADER, TICKET_HEADER, Director, RequestInfo

log = logs.get("prefix_router.handlers")

# Envoy's gRPC messages default to a 4 MiB limit; ~62 KB chunks keep each well under it.
CHUNK = 62 * 1024

_BODY_MODE = processing_mode_pb2.ProcessingMode.BodySendMode
_DUPLEX = _BODY_MODE.Value("FULL_DUPLEX_STREAMED")
_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
_CONTINUE_HEADERS = pb.ProcessingResponse(request_headers=pb.HeadersResponse())
_CONTINUE_BODY = pb.ProcessingResponse(request_body=pb.BodyResponse())
_CONTINUE_TRAILERS = pb.ProcessingResponse(request_trailers=pb.TrailersResponse())
_MODE = processing_mode_pb2.ProcessingMode
# A sampled buffered request: the configured request phases, plus the response's headers and body.
_OBSERVE = _MODE(
    request_header_mode=_MODE.SEND, request_body_mode=_MODE.BUFFERED, request_trailer_mode=_MODE.SKIP,
    response_header_mode=_MODE.SEND, response_body_mode=_MODE.STREAMED, response_trailer_mode=_MODE.SKIP,
)
_OBSERVE_HEADERS = pb.ProcessingResponse(request_headers=pb.HeadersResponse(), mode_override=_OBSERVE)
_CONTINUE_RESPONSE_HEADERS = pb.ProcessingResponse(response_headers=pb.HeadersResponse())
_CONTINUE_RESPONSE_BODY = pb.ProcessingResponse(response_body=pb.BodyResponse())


def headers_dict(msg: pb.HttpHeaders) -> dict[str, str]:
    """Envoy sends header values as ``raw_value`` bytes (newer) or ``value`` (older)."""
    out = {}
    for h in msg.headers.headers:
        out[h.key] = h.raw_value.decode("utf-8", "replace") if h.raw_value else h.value
    return out


def decision_mutation(header_name: str, address: str, ticket: str, observe: str = "") -> pb.CommonResponse:
    """The decision as Envoy applies it: the upstream, the ticket, and for a request whose response
    is to be read in duplex mode the prediction (``observe``) that also selects the observing route."""
    pairs = [(header_name, address), (TICKET_HEADER, ticket)] + ([(OBSERVE_HEADER, observe)] if observe else [])
    return pb.CommonResponse(
        header_mutation=pb.HeaderMutation(
            set_headers=[
                base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=k, raw_value=v.encode()), append_action=_OVERWRITE)
                for k, v in pairs
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


class Exchange:
    """One request's ext_proc stream: what has arrived and whether its decision went out.

    ``answered`` is set once the final answer (the decision, or the 503) has been produced;
    ``decided`` when the director holds the request on an upstream; ``delivered`` once that answer
    has been handed to gRPC. A stream that ends in between must give the request back: :meth:`close`.
    """

    __slots__ = ("director", "info", "answered", "decided", "delivered", "observing", "response", "response_size")
    observe_by_route = False  # a sampled response is read through the observing route (duplex), not mode_override

    def __init__(self, director: Director, headers: dict[str, str]) -> None:
        self.director = director
        self.info: RequestInfo = director.begin(headers)
        self.answered = False
        self.decided = False
        self.delivered = False
        self.observing = False  # the response is being read for its usage (--observe-sample)
        self.response: bytearray | None = None  # what is kept of it, only while observing
        self.response_size = 0

    def on_response_headers(self, msg: pb.HttpHeaders) -> list[pb.ProcessingResponse]:
        if self.observing:
            # :status reaches the service only if the forward rules allow it (the shipped ones do not:
            # an error then shows as a body without usage)
            status = headers_dict(msg).get(":status", "200")
            if status != "200" or msg.end_of_stream:
                self.observing = False
                metrics.OBSERVATIONS.labels("not_ok" if status != "200" else "no_usage").inc()
        return [_CONTINUE_RESPONSE_HEADERS]

    def on_response_body(self, msg: pb.HttpBody) -> list[pb.ProcessingResponse]:
        """Each chunk goes on unchanged; the usage is read at the end."""
        if self.observing:
            if self.response is None:
                self.response = bytearray()
            self.response_size += len(msg.body)
            usage.keep(self.response, msg.body, self.response_size)
            if msg.end_of_stream:
                self._read_response("no_usage")
        return [_CONTINUE_RESPONSE_BODY]

    def _read_response(self, unread: str) -> None:
        """The observation ends: the usage in what was kept goes to the director, or the outcome
        ``unread`` is counted."""
        kept, self.response, self.observing = self.response, None, False
        found = usage.prompt_and_cached(kept, usage.is_whole(self.response_size)) if kept and self.decided else None
        if found is None:
            metrics.OBSERVATIONS.labels(unread).inc()
        else:
            self.director.observed(self.info, *found)

    def _decide(self, on_headers: bool, body: bytes | None, body_too_large: bool = False) -> pb.ProcessingResponse:
        """The decision as the answer to the request headers (``on_headers``) or to the request
        body, or the 503."""
        director = self.director
        address = director.route(self.info, body, body_too_large=body_too_large)
        self.answered = True
        if address is None:
            return unavailable()
        self.decided = True
        info = self.info
        observe = f"{info.matched}/{info.text_len}" if self.observe_by_route and director.observe_now(info) else ""
        if observe:
            director.observing(info)
        common = decision_mutation(director.header_name, address, info.ticket, observe)
        if on_headers:
            return pb.ProcessingResponse(request_headers=pb.HeadersResponse(response=common))
        return pb.ProcessingResponse(request_body=pb.BodyResponse(response=common))

    def on_headers(self, end_of_stream: bool) -> list[pb.ProcessingResponse]:
        raise NotImplementedError

    def on_body(self, body: pb.HttpBody) -> list[pb.ProcessingResponse]:
        raise NotImplementedError

    def on_trailers(self) -> list[pb.ProcessingResponse]:
        return [_CONTINUE_TRAILERS]

    @property
    def finished(self) -> bool:
        """Nothing more on this stream matters to the service, so it may end it now."""
        return False

    def sent(self) -> None:
        """The answers returned so far are being handed to gRPC (yielded, with no await between
        the decision and the yield: a stream cannot end in between)."""
        if self.answered:
            self.delivered = True

    def close(self) -> bool:
        """The stream ended; a decision that never reached Envoy is given back. Returns whether
        the stream ended before its answer went out."""
        if self.observing and self.delivered:
            # Envoy may close the stream without a last end-of-stream message: what arrived is read;
            # nothing readable means the response never ended (reset, client gone)
            self._read_response("cut")
        if self.decided and not self.delivered:
            self.director.abandoned(self.info)
        return not self.delivered


class BufferedExchange(Exchange):
    """``BUFFERED``: CONTINUE on the headers, the decision in the answer to the whole body."""

    __slots__ = ()

    def on_headers(self, end_of_stream: bool) -> list[pb.ProcessingResponse]:
        if end_of_stream:
            return [self._decide(True, None)]
        if self.director.observe_now():
            self.observing = self.info.sampled = True
            return [_OBSERVE_HEADERS]
        return [_CONTINUE_HEADERS]

    def on_body(self, body: pb.HttpBody) -> list[pb.ProcessingResponse]:
        if self.answered:  # the answer already went out: nothing more to change
            return [_CONTINUE_BODY]
        return [self._decide(False, body.body)]


class DuplexExchange(Exchange):
    """``FULL_DUPLEX_STREAMED``: hold the headers' answer until the body ends, decide, answer the
    headers with the decision, then stream the held body back unchanged.

    Past ``max_body_bytes`` the body cannot be routed on: the request is decided by load at once
    and the rest streams through, so an unbounded body is never held in memory.
    """

    __slots__ = ("chunks", "size")
    observe_by_route = True

    def __init__(self, director: Director, headers: dict[str, str]) -> None:
        super().__init__(director, headers)
        self.chunks: list[bytes] = []
        self.size = 0

    def on_headers(self, end_of_stream: bool) -> list[pb.ProcessingResponse]:
        return [self._decide(True, None)] if end_of_stream else []

    def on_body(self, body: pb.HttpBody) -> list[pb.ProcessingResponse]:
        if self.answered:  # the decision already went out: pass the rest through
            return _body_chunks([body.body], body.end_of_stream)
        director = self.director
        self.chunks.append(body.body)
        self.size += len(body.body)
        if not director.hold(len(body.body)):  # all streams together hold too much already
            metrics.BODIES_NOT_HELD.inc()
            return self._finish(True, body.end_of_stream, held=self.size - len(body.body))
        too_large = self.size > director.max_body_bytes
        if body.end_of_stream or too_large:
            return self._finish(too_large, body.end_of_stream)
        return []

    def on_trailers(self) -> list[pb.ProcessingResponse]:
        out = [] if self.answered else self._finish(False, False)
        out.append(_CONTINUE_TRAILERS)
        return out

    def close(self) -> bool:
        if self.size:  # the stream ended mid-body: what it held is let go
            self.director.let_go(self.size)
            self.size = 0
        return super().close()

    def _finish(self, too_large: bool, end_of_stream: bool, held: int | None = None) -> list[pb.ProcessingResponse]:
        chunks, self.chunks = self.chunks, []
        self.director.let_go(self.size if held is None else held)
        self.size = 0
        answer = self._decide(True, None if too_large else b"".join(chunks), body_too_large=too_large)
        if not self.decided:  # the 503 ends the request
            return [answer]
        return [answer, *_body_chunks(chunks, end_of_stream)]


class ObserveExchange(Exchange):
    """The observing filter's stream for one sampled duplex request (``prefix_router.observe`` in
    envoy/duplex.yaml): its request headers carry the upstream and the prediction the decision put
    there; its response's usage is read at the end. Nothing is decided or held here. In
    observability mode Envoy expects no answers, so none are sent (``answers`` False)."""

    __slots__ = ("answers", "ended")

    def __init__(self, director: Director, headers: dict[str, str], answers: bool) -> None:
        super().__init__(director, headers)
        self.answers = answers
        self.ended = False  # the response's end arrived: nothing more will come that matters
        self.decided = self.delivered = True  # the deciding stream owns the request: nothing to give back here
        parsed = _prediction(headers.get(OBSERVE_HEADER, ""))
        upstream = headers.get(director.header_name, "")
        if parsed is None or not upstream:
            metrics.OBSERVATIONS.labels("bad_header").inc()
            log.warning("observe_header_invalid", request_id=self.info.request_id)
            return
        self.info.upstream, (self.info.matched, self.info.text_len) = upstream, parsed
        self.observing = True

    @property
    def finished(self) -> bool:
        # Envoy keeps an observability-mode stream open for deferred_close_timeout (5 s) after the
        # request, and every open stream counts against the service cluster's limits: once the
        # response ended (and was read), the service ends the stream itself.
        return self.ended

    def _reply(self, out: list[pb.ProcessingResponse]) -> list[pb.ProcessingResponse]:
        return out if self.answers else []

    def on_headers(self, end_of_stream: bool) -> list[pb.ProcessingResponse]:
        return self._reply([_CONTINUE_HEADERS])

    def on_body(self, body: pb.HttpBody) -> list[pb.ProcessingResponse]:
        return self._reply([_CONTINUE_BODY])

    def on_trailers(self) -> list[pb.ProcessingResponse]:
        return self._reply([_CONTINUE_TRAILERS])

    def on_response_headers(self, msg: pb.HttpHeaders) -> list[pb.ProcessingResponse]:
        self.ended = msg.end_of_stream
        return self._reply(super().on_response_headers(msg))

    def on_response_body(self, msg: pb.HttpBody) -> list[pb.ProcessingResponse]:
        self.ended = msg.end_of_stream
        return self._reply(super().on_response_body(msg))


def _prediction(value: str) -> tuple[int, int] | None:
    """``matched/length`` as the decision wrote it, or None for anything else."""
    matched, sep, length = value.partition("/")
    if not (sep and matched.isdigit() and length.isdigit() and len(matched) <= 12 and len(length) <= 12):
        return None
    m, n = int(matched), int(length)
    return (m, n) if m <= n else None


# Phases the shipped configs never send (their response modes are SKIP/NONE). A config that enables
# them must not leave Envoy waiting out message_timeout, so each gets an empty "continue".
_PASS_THROUGH = {
    "response_headers": pb.ProcessingResponse(response_headers=pb.HeadersResponse()),
    "response_body": pb.ProcessingResponse(response_body=pb.BodyResponse()),
    "response_trailers": pb.ProcessingResponse(response_trailers=pb.TrailersResponse()),
}


class ExternalProcessor(pb_grpc.ExternalProcessorServicer):
    """``envoy.service.ext_proc.v3.ExternalProcessor/Process`` over a :class:`Director`."""

    def __init__(self, director: Director) -> None:
        self.director = director

    async def Process(  # noqa: N802 - gRPC method name
        self, request_iterator: AsyncIterator[pb.ProcessingRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ProcessingResponse]:
        exchange: Exchange | None = None
        try:
            async for req in request_iterator:
                kind = req.WhichOneof("request")
                if kind == "request_headers":
                    if exchange is not None:
                        raise _ProtocolError("a second request_headers on one stream")
                    headers = headers_dict(req.request_headers)
                    # an observing stream never decides: in observability mode Envoy ignores answers,
                    # so a decision there would hold a request that is not going anywhere
                    if OBSERVE_HEADER in headers or req.observability_mode:
                        exchange = ObserveExchange(self.director, headers, answers=not req.observability_mode)
                    else:
                        duplex = req.HasField("protocol_config") and req.protocol_config.request_body_mode == _DUPLEX
                        exchange = (DuplexExchange if duplex else BufferedExchange)(self.director, headers)
                    out = exchange.on_headers(req.request_headers.end_of_stream)
                elif kind == "response_headers" and exchange is not None:
                    out = exchange.on_response_headers(req.response_headers)
                elif kind == "response_body" and exchange is not None:
                    out = exchange.on_response_body(req.response_body)
                elif kind in _PASS_THROUGH:
                    out = [_PASS_THROUGH[kind]]
                elif exchange is None:
                    raise _ProtocolError(f"{kind} before request_headers")
                elif kind == "request_body":
                    out = exchange.on_body(req.request_body)
                elif kind == "request_trailers":
                    out = exchange.on_trailers()
                else:
                    raise _ProtocolError(f"unknown message {kind!r}")
                # Yielding hands an answer to gRPC. When Envoy closes the stream after the last
                # one, gRPC closes this generator at that yield and nothing after it runs: so the
                # answers count as sent as they are handed over, not after.
                if exchange is not None:
                    exchange.sent()
                for r in out:
                    yield r
                if exchange is not None and exchange.finished:
                    break
        except _ProtocolError as exc:
            metrics.STREAM_ERRORS.labels("INVALID_ARGUMENT").inc()
            log.warning("stream_protocol_error", error=str(exc), request_id=exchange.info.request_id if exchange else "")
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except Exception:
            metrics.STREAM_ERRORS.labels("INTERNAL").inc()
            log.exception("stream_failed", request_id=exchange.info.request_id if exchange else "")
            raise
        finally:
            # Envoy closes (or cancels) a stream as soon as it expects nothing more: that is the
            # normal end once the answer went out, and no error. Before it, the request went
            # elsewhere (the client left mid-upload, or Envoy timed out and failed open).
            if exchange is not None and exchange.close():
                metrics.STREAMS_ABANDONED.inc()
                log.info("stream_ended_before_answer", request_id=exchange.info.request_id)


class _ProtocolError(Exception):
    """Envoy (or whoever holds the stream) broke the ext_proc message order."""


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
