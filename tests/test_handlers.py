"""The ext_proc protocol against the real grpc.aio server, in process, on a free port."""

import asyncio

import grpc
import orjson
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from extproc import metrics
from extproc.config import build
from extproc.director import TICKET_HEADER
from extproc.handlers import CHUNK
from extproc.server import Service

POOL = ["127.0.0.1:30001", "127.0.0.1:30002"]
MODE = processing_mode_pb2.ProcessingMode.BodySendMode


@pytest.fixture
async def service():
    cfg = build({"grpc_listen": "127.0.0.1:0", "admin_listen": "127.0.0.1:0", "admin_grpc_listen": "127.0.0.1:0", "upstreams": POOL}, env={})
    svc = Service(cfg)
    await svc.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{svc.ports['grpc']}")
    yield svc.director, channel
    await channel.close()
    await svc.stop(delay=0)


def headers(path="/v1/chat/completions", method="POST", eos=False, mode="BUFFERED", extra=()):
    hs = [(":path", path), (":method", method), ("x-request-id", "rid-1"), *extra]
    return pb.ProcessingRequest(
        request_headers=pb.HttpHeaders(
            headers=base_pb2.HeaderMap(headers=[base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in hs]),
            end_of_stream=eos,
        ),
        protocol_config=pb.ProtocolConfiguration(request_body_mode=MODE.Value(mode)),
    )


def body(data: bytes, eos: bool):
    return pb.ProcessingRequest(request_body=pb.HttpBody(body=data, end_of_stream=eos))


def chat(text="hello"):
    return orjson.dumps({"model": "m", "messages": [{"role": "user", "content": text}]})


def mutation(common: pb.CommonResponse) -> dict[str, str]:
    return {h.header.key: (h.header.raw_value or h.header.value.encode()).decode() for h in common.header_mutation.set_headers}


async def exchange(channel, requests):
    stub = pb_grpc.ExternalProcessorStub(channel)
    call = stub.Process(iter(requests))
    return [r async for r in call]


async def test_buffered_decides_in_the_body_response(service):
    director, ch = service
    out = await exchange(ch, [headers(extra=[("x-upstream-host", "127.0.0.1:9901")]), body(chat(), True)])
    assert [r.WhichOneof("response") for r in out] == ["request_headers", "request_body"]
    assert not out[0].request_headers.response.header_mutation.set_headers
    common = out[1].request_body.response
    assert common.clear_route_cache
    m = mutation(common)
    assert m["x-upstream-host"] in POOL  # overwrites whatever the client sent
    assert m[TICKET_HEADER]
    assert director.pool.tickets.outstanding() == 1


async def test_duplex_holds_headers_then_streams_the_body_back(service):
    _, ch = service
    payload = chat("x" * (3 * CHUNK))
    parts = [payload[: CHUNK // 2], payload[CHUNK // 2 : 2 * CHUNK], payload[2 * CHUNK :]]
    reqs = [headers(mode="FULL_DUPLEX_STREAMED")] + [body(p, i == 2) for i, p in enumerate(parts)]
    out = await exchange(ch, reqs)
    assert out[0].WhichOneof("response") == "request_headers"
    assert mutation(out[0].request_headers.response)["x-upstream-host"] in POOL
    assert out[0].request_headers.response.clear_route_cache
    streamed = [r.request_body.response.body_mutation.streamed_response for r in out[1:]]
    assert b"".join(s.body for s in streamed) == payload
    assert all(len(s.body) <= CHUNK for s in streamed)
    assert [s.end_of_stream for s in streamed] == [False] * (len(streamed) - 1) + [True]


async def test_duplex_with_trailers(service):
    _, ch = service
    reqs = [headers(mode="FULL_DUPLEX_STREAMED"), body(chat(), False), pb.ProcessingRequest(request_trailers=pb.HttpTrailers())]
    out = await exchange(ch, reqs)
    kinds = [r.WhichOneof("response") for r in out]
    assert kinds == ["request_headers", "request_body", "request_trailers"]
    assert out[1].request_body.response.body_mutation.streamed_response.body == chat()
    assert not out[1].request_body.response.body_mutation.streamed_response.end_of_stream


async def test_duplex_body_over_the_cap_is_routed_early_and_streamed(service):
    director, ch = service
    director.cfg = build({"upstreams": POOL, "max_body_bytes": "1000"}, env={})
    before = metrics.BAD_INPUT.labels("body_too_large")._value.get()
    reqs = [headers(mode="FULL_DUPLEX_STREAMED"), body(b"a" * 600, False), body(b"b" * 600, False), body(b"c" * 10, True)]
    out = await exchange(ch, reqs)
    assert out[0].WhichOneof("response") == "request_headers"
    data = b"".join(r.request_body.response.body_mutation.streamed_response.body for r in out[1:])
    assert data == b"a" * 600 + b"b" * 600 + b"c" * 10
    assert out[-1].request_body.response.body_mutation.streamed_response.end_of_stream
    assert metrics.BAD_INPUT.labels("body_too_large")._value.get() == before + 1


@pytest.mark.parametrize("mode", ["BUFFERED", "FULL_DUPLEX_STREAMED"])
async def test_no_body_is_decided_on_the_headers(service, mode):
    _, ch = service
    out = await exchange(ch, [headers(path="/v1/models", method="GET", eos=True, mode=mode)])
    assert len(out) == 1 and mutation(out[0].request_headers.response)["x-upstream-host"] in POOL


@pytest.mark.parametrize("bad", [b"{nope", b"\xff\xfe", b"[]", b'{"messages": 5}', b"[" * 100000])
async def test_bad_body_still_routes_and_is_counted(service, bad):
    director, ch = service
    counted = sum(s.value for m in metrics.BAD_INPUT.collect() for s in m.samples)
    out = await exchange(ch, [headers(), body(bad, True)])
    assert mutation(out[1].request_body.response)["x-upstream-host"] in POOL
    assert sum(s.value for m in metrics.BAD_INPUT.collect() for s in m.samples) == counted + 1
    assert director.pool.tickets.outstanding() == 1


async def test_no_healthy_upstream_is_an_openai_style_503(service):
    director, ch = service
    for u in director.pool.upstreams.values():
        u.active_ok = False
    out = await exchange(ch, [headers(), body(chat(), True)])
    imm = out[-1].immediate_response
    assert imm.status.code == 503
    assert orjson.loads(imm.body)["error"]["code"] == 503


async def test_conversation_sticks_and_access_log_releases_inflight(service):
    director, ch = service

    async def finish(*mutations):
        async def entries():
            yield als_pb2.StreamAccessLogsMessage(http_logs=als_pb2.StreamAccessLogsMessage.HTTPAccessLogEntries(
                log_entry=[accesslog_pb2.HTTPAccessLogEntry(request=accesslog_pb2.HTTPRequestProperties(request_headers={TICKET_HEADER: m[TICKET_HEADER]})) for m in mutations]
            ))

        await als_pb2_grpc.AccessLogServiceStub(ch).StreamAccessLogs(entries())

    first = await exchange(ch, [headers(), body(chat("a long shared prompt " * 20), True)])
    m1 = mutation(first[1].request_body.response)
    assert director.pool.tickets.outstanding() == 1
    await finish(m1)  # the first turn's response ends, as Envoy reports it
    assert director.pool.tickets.outstanding() == 0
    second = await exchange(ch, [headers(), body(chat("a long shared prompt " * 20 + "and more"), True)])
    m2 = mutation(second[1].request_body.response)
    assert m1["x-upstream-host"] == m2["x-upstream-host"]
    assert director.pool.tickets.outstanding() == 1
    await finish(m2, m2)  # a duplicate report releases nothing twice
    assert director.pool.tickets.outstanding() == 0


async def test_stream_cancelled_mid_body_is_counted_as_abandoned_not_as_an_error(service):
    director, ch = service
    stub = pb_grpc.ExternalProcessorStub(ch)
    errors = metrics.STREAM_ERRORS.labels("INTERNAL")._value.get()
    abandoned = metrics.STREAMS_ABANDONED._value.get()
    gate = asyncio.Event()

    async def reqs():
        yield headers(mode="FULL_DUPLEX_STREAMED")
        yield body(b"partial", False)
        await gate.wait()

    call = stub.Process(reqs())
    await asyncio.sleep(0.1)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        async for _ in call:
            pass
    for _ in range(50):
        if metrics.STREAMS_ABANDONED._value.get() > abandoned:
            break
        await asyncio.sleep(0.02)
    assert metrics.STREAMS_ABANDONED._value.get() == abandoned + 1
    assert metrics.STREAM_ERRORS.labels("INTERNAL")._value.get() == errors
    assert director.pool.tickets.outstanding() == 0


async def test_a_body_before_headers_is_a_protocol_error(service):
    _, ch = service
    before = metrics.STREAM_ERRORS.labels("INVALID_ARGUMENT")._value.get()
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await exchange(ch, [body(chat(), True)])
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert metrics.STREAM_ERRORS.labels("INVALID_ARGUMENT")._value.get() == before + 1


async def test_response_phases_a_config_may_enable_get_a_continue(service):
    _, ch = service
    out = await exchange(ch, [
        headers(), body(chat(), True),
        pb.ProcessingRequest(response_headers=pb.HttpHeaders()),
        pb.ProcessingRequest(response_body=pb.HttpBody(body=b"x", end_of_stream=True)),
    ])
    assert [r.WhichOneof("response") for r in out] == ["request_headers", "request_body", "response_headers", "response_body"]


async def test_health_service(service):
    _, ch = service
    r = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service="envoy.service.ext_proc.v3.ExternalProcessor"))
    assert r.status == health_pb2.HealthCheckResponse.SERVING


def test_the_503_is_exactly_an_openai_error_in_json():
    from extproc.handlers import unavailable

    imm = unavailable().immediate_response
    assert imm.status.code == 503 and imm.details == "prefix_router_no_healthy_upstream"
    [h] = imm.headers.set_headers
    assert (h.header.key, h.header.raw_value) == ("content-type", b"application/json")
    assert h.append_action == base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
    assert orjson.loads(imm.body) == {"error": {"message": "no healthy upstream is available to serve this request", "type": "service_unavailable", "code": 503}}


async def test_a_fault_in_the_service_is_an_internal_error_with_its_reason(service, monkeypatch):
    director, ch = service

    def broken(headers):
        raise RuntimeError("planted")

    monkeypatch.setattr(director, "begin", broken)
    before = metrics.STREAM_ERRORS.labels("INTERNAL")._value.get()
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await exchange(ch, [headers(), body(chat(), True)])
    assert e.value.code() == grpc.StatusCode.UNKNOWN
    assert metrics.STREAM_ERRORS.labels("INTERNAL")._value.get() == before + 1


async def test_protocol_errors_say_what_was_wrong(service):
    _, ch = service
    for requests, words in (([body(chat(), True)], "request_body before request_headers"),
                            ([headers(), headers()], "a second request_headers on one stream"),
                            ([headers(), pb.ProcessingRequest()], "unknown message None")):
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await exchange(ch, requests)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and e.value.details() == words


async def test_a_normal_stream_is_neither_abandoned_nor_an_error(service):
    director, ch = service
    abandoned = metrics.STREAMS_ABANDONED._value.get()
    errors = sum(s.value for m in metrics.STREAM_ERRORS.collect() for s in m.samples)
    for mode in ("BUFFERED", "FULL_DUPLEX_STREAMED"):
        await exchange(ch, [headers(mode=mode), body(chat(), True)])
    await asyncio.sleep(0.05)
    assert metrics.STREAMS_ABANDONED._value.get() == abandoned
    assert sum(s.value for m in metrics.STREAM_ERRORS.collect() for s in m.samples) == errors
    assert director.pool.tickets.outstanding() == 2  # both held until Envoy reports them



@pytest.mark.parametrize("mode", ["BUFFERED", "FULL_DUPLEX_STREAMED"])
async def test_a_stream_closed_right_after_its_answer_keeps_the_request_in_flight(service, mode):
    """Envoy closes the stream as soon as it has what it expects, and gRPC then closes the
    handler at the yield that handed the answer over (seen through Envoy: one request in six).
    The answer went out: the request stays held until the access log reports it."""
    from extproc.handlers import ExternalProcessor

    director, _ = service
    abandoned = metrics.STREAMS_ABANDONED._value.get()

    async def requests():
        yield headers(mode=mode)
        yield body(chat(f"closed right after the answer {mode}"), True)

    handler = ExternalProcessor(director).Process(requests(), None)
    async for r in handler:
        common = r.request_headers.response if r.HasField("request_headers") else r.request_body.response
        if common.header_mutation.set_headers:
            break  # the decision was handed over; now gRPC closes the handler here
    await handler.aclose()
    assert director.pool.tickets.outstanding() == 1
    assert metrics.STREAMS_ABANDONED._value.get() == abandoned


def response_headers(status="200", eos=False):
    return pb.ProcessingRequest(response_headers=pb.HttpHeaders(
        headers=base_pb2.HeaderMap(headers=[base_pb2.HeaderValue(key=":status", raw_value=status.encode())]), end_of_stream=eos))


def response_body(data: bytes, eos: bool):
    return pb.ProcessingRequest(response_body=pb.HttpBody(body=data, end_of_stream=eos))


USAGE = orjson.dumps({"choices": [{"message": {"content": "hi"}}], "usage": {"prompt_tokens": 100, "prompt_tokens_details": {"cached_tokens": 64}}})


async def test_a_sampled_buffered_request_reads_its_response_and_changes_nothing(service):
    director, ch = service
    director.cfg = build({"upstreams": POOL, "observe_sample": 1.0}, env={})
    read = metrics.OBSERVATIONS.labels("read")._value.get()
    out = await exchange(ch, [headers(), body(chat("x" * 400), True), response_headers(), response_body(USAGE[:50], False), response_body(USAGE[50:], True)])
    assert [r.WhichOneof("response") for r in out] == ["request_headers", "request_body", "response_headers", "response_body", "response_body"]
    mode = out[0].mode_override
    # the configured request phases stay; the response's headers and body are asked for, streamed
    assert (mode.request_body_mode, mode.response_header_mode, mode.response_body_mode) == (
        processing_mode_pb2.ProcessingMode.BUFFERED, processing_mode_pb2.ProcessingMode.SEND, processing_mode_pb2.ProcessingMode.STREAMED)
    for r in out[2:]:  # never a change to what the client receives
        common = r.response_headers.response if r.HasField("response_headers") else r.response_body.response
        assert not common.header_mutation.set_headers and not common.HasField("body_mutation") and common.status == 0
    upstream = mutation(out[1].request_body.response)["x-upstream-host"]
    assert director.observed_totals == {upstream: [100, 64, 1]}
    assert metrics.OBSERVATIONS.labels("read")._value.get() == read + 1
    assert metrics.OBSERVED_CACHED.labels(upstream)._value.get() >= 64


async def test_unsampled_errors_and_duplex_requests_are_not_read(service):
    director, ch = service
    out = await exchange(ch, [headers(), body(chat(), True)])
    assert not out[0].HasField("mode_override")  # --observe-sample 0, the default: never asked
    director.cfg = build({"upstreams": POOL, "observe_sample": 1.0}, env={})
    not_ok = metrics.OBSERVATIONS.labels("not_ok")._value.get()
    await exchange(ch, [headers(), body(chat(), True), response_headers("503"), response_body(USAGE, True)])
    assert metrics.OBSERVATIONS.labels("not_ok")._value.get() == not_ok + 1 and director.observed_totals == {}
    out = await exchange(ch, [headers(mode="FULL_DUPLEX_STREAMED"), body(chat(), True)])
    assert not out[0].HasField("mode_override")  # Envoy ignores an override in full-duplex mode


def observing(extra, observability=True):
    """The first message of the observing filter's stream (envoy/duplex.yaml, prefix_router.observe)."""
    req = headers(mode="NONE", extra=extra)
    req.observability_mode = observability
    return req


async def test_a_sampled_duplex_decision_names_its_prediction_for_the_observing_route(service):
    director, ch = service
    out = await exchange(ch, [headers(mode="FULL_DUPLEX_STREAMED"), body(chat("w" * 300), True)])
    assert "x-prefix-router-observe" not in mutation(out[0].request_headers.response)  # not sampled by default
    director.cfg = build({"upstreams": POOL, "observe_sample": 1.0}, env={})
    out = await exchange(ch, [headers(mode="FULL_DUPLEX_STREAMED"), body(chat("w" * 300 + " and more"), True)])
    set_ = mutation(out[0].request_headers.response)

    def text_len(content: str) -> int:
        return len(director._routing_input("/v1/chat/completions", chat(content), None).text)

    # the earlier request's text is held there: the prediction is its length, of this text's
    assert set_["x-prefix-router-observe"] == f"{text_len('w' * 300)}/{text_len('w' * 300 + ' and more')}"
    assert out[0].request_headers.response.clear_route_cache  # so that Envoy picks the observing route
    out = await exchange(ch, [headers(mode="BUFFERED"), body(chat("v"), True)])
    assert "x-prefix-router-observe" not in mutation(out[1].request_body.response)  # buffered mode asks by mode_override


async def test_the_observing_stream_reads_the_usage_and_answers_nothing_in_observability_mode(service):
    director, ch = service
    up = POOL[1]
    read = metrics.OBSERVATIONS.labels("read")._value.get()
    extra = (("x-upstream-host", up), ("x-prefix-router-observe", "90/100"), (":status", "200"))
    out = await exchange(ch, [observing(extra), response_headers(), response_body(USAGE[:30], False), response_body(USAGE[30:], True)])
    assert out == []  # Envoy waits for nothing: the client's response is neither changed nor delayed
    assert director.observed_totals == {up: [100, 64, 1]}
    assert metrics.OBSERVATIONS.labels("read")._value.get() == read + 1
    # a config without observability mode gets a "continue" for each message instead of a stall
    out = await exchange(ch, [observing(extra, observability=False), response_headers(), response_body(USAGE, True)])
    assert [r.WhichOneof("response") for r in out] == ["request_headers", "response_headers", "response_body"]
    assert director.observed_totals == {up: [200, 128, 2]}
    assert director.pool.tickets.outstanding() == 0  # nothing decided, nothing held


async def test_the_service_ends_an_observing_stream_once_the_response_is_read(service):
    """Envoy holds an observability-mode stream open for 5 s after the request (deferred close), and
    every open stream counts against the service cluster's 1,024-request circuit breaker: measured
    with wrk, the first 1,023 sampled requests were served and every later one failed open. So the
    service ends the stream itself: here Envoy's side never closes, and the call must still end."""
    director, ch = service
    extra = (("x-upstream-host", POOL[0]), ("x-prefix-router-observe", "1/2"))
    held = asyncio.Event()

    async def envoy_side():
        for m in (observing(extra), response_headers(), response_body(USAGE, True)):
            yield m
        await held.wait()  # never half-closes

    call = pb_grpc.ExternalProcessorStub(ch).Process(envoy_side())

    async def answers():
        return [r async for r in call]

    try:  # the service closed the stream: the iteration ends (a liveness bound, not a timing)
        assert await asyncio.wait_for(answers(), 10) == []
    finally:
        held.set()
    assert await call.code() == grpc.StatusCode.OK
    assert director.observed_totals == {POOL[0]: [100, 64, 1]}


@pytest.mark.parametrize("value", ["", "90", "a/b", "101/100", "-1/5", "1/" + "9" * 20, "1/2/3"])
async def test_an_observing_stream_without_a_valid_prediction_is_counted_and_ignored(service, value):
    director, ch = service
    bad = metrics.OBSERVATIONS.labels("bad_header")._value.get()
    extra = (("x-upstream-host", POOL[0]), ("x-prefix-router-observe", value))
    out = await exchange(ch, [observing(extra), response_headers(), response_body(USAGE, True)])
    assert out == [] and director.observed_totals == {}
    assert metrics.OBSERVATIONS.labels("bad_header")._value.get() == bad + 1


async def test_a_stream_in_observability_mode_never_decides_even_without_the_header(service):
    director, ch = service
    bad = metrics.OBSERVATIONS.labels("bad_header")._value.get()
    out = await exchange(ch, [observing((("x-upstream-host", POOL[0]),)), body(chat(), True), response_headers(), response_body(USAGE, True)])
    assert out == [] and director.pool.tickets.outstanding() == 0 and director.tree.node_count() == 0
    assert metrics.OBSERVATIONS.labels("bad_header")._value.get() == bad + 1


async def test_an_observing_stream_for_an_upstream_outside_the_pool_changes_nothing(service):
    director, ch = service
    extra = (("x-upstream-host", "10.9.9.9:1"), ("x-prefix-router-observe", "1/2"))
    await exchange(ch, [observing(extra), response_headers(), response_body(USAGE, True)])
    assert director.observed_totals == {}


async def test_a_response_whose_end_never_comes_is_read_from_what_arrived(service):
    """Envoy may close the stream without a last end-of-stream message: the usage already seen counts."""
    director, ch = service
    director.cfg = build({"upstreams": POOL, "observe_sample": 1.0}, env={})
    events = b'data: {"choices":[],"usage":{"prompt_tokens":50,"prompt_tokens_details":{"cached_tokens":48}}}\n\ndata: [DONE]\n\n'
    await exchange(ch, [headers(), body(chat("y" * 300), True), response_headers(), response_body(events, False)])
    await asyncio.sleep(0.1)  # the stream's close runs after the last answer
    assert [v[:2] for v in director.observed_totals.values()] == [[50, 48]]
    cut = metrics.OBSERVATIONS.labels("cut")._value.get()
    await exchange(ch, [headers(), body(chat("z" * 300), True), response_headers(), response_body(b'data: {"choices":[', False)])
    await asyncio.sleep(0.1)
    assert metrics.OBSERVATIONS.labels("cut")._value.get() == cut + 1
