"""The request lifecycle without gRPC: the exchanges of both body modes over a real director."""

import orjson
import pytest
from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from google.protobuf import wrappers_pb2

from extproc import metrics, policy
from extproc.als import upstream_failed
from extproc.config import build
from extproc.director import Director, RequestInfo
from extproc.handlers import BufferedExchange, DuplexExchange

POOL = ["127.0.0.1:1", "127.0.0.1:2"]
BODY = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "hello there"}]})
HEADERS = {":path": "/v1/chat/completions", "x-request-id": "r"}


@pytest.fixture
def director():
    d = Director(build({"upstreams": POOL}, env={}), seed=1)
    d.set_upstreams(POOL)
    return d


def chunk(data: bytes, eos: bool) -> pb.HttpBody:
    return pb.HttpBody(body=data, end_of_stream=eos)


@pytest.mark.parametrize("cls", [BufferedExchange, DuplexExchange])
def test_a_decision_that_never_reached_envoy_is_given_back(director, cls):
    x = cls(director, HEADERS)
    x.on_headers(False)
    out = x.on_body(chunk(BODY, True))
    assert out and x.decided and director.pool.tickets.outstanding() == 1
    x.close()  # the stream ended before sent(): Envoy never got the decision
    assert director.pool.tickets.outstanding() == 0


@pytest.mark.parametrize("cls", [BufferedExchange, DuplexExchange])
def test_a_delivered_decision_stays_held_until_envoy_reports_it(director, cls):
    x = cls(director, HEADERS)
    x.on_headers(False)
    x.on_body(chunk(BODY, True))
    x.sent()
    x.close()
    assert director.pool.tickets.outstanding() == 1
    assert director.finished(x.info.ticket, failed=False)
    assert director.pool.tickets.outstanding() == 0


def test_duplex_holds_until_the_end_then_answers_headers_and_streams_back(director):
    x = DuplexExchange(director, HEADERS)
    assert x.on_headers(False) == []
    assert x.on_body(chunk(BODY[:10], False)) == []
    out = x.on_body(chunk(BODY[10:], True))
    assert [r.WhichOneof("response") for r in out] == ["request_headers", "request_body"]
    assert out[1].request_body.response.body_mutation.streamed_response.body == BODY
    more = x.on_body(chunk(b"late", True))  # after the decision: passed through
    assert more[0].request_body.response.body_mutation.streamed_response.body == b"late"


def test_header_name_change_on_reload_reaches_the_next_decision(director):
    director.reconfigure(build({"upstreams": POOL, "header_name": "x-pinned"}, env={}))
    x = BufferedExchange(director, HEADERS)
    x.on_headers(False)
    out = x.on_body(chunk(BODY, True))
    keys = [h.header.key for h in out[0].request_body.response.header_mutation.set_headers]
    assert "x-pinned" in keys and "x-upstream-host" not in keys


class Surprise(Exception):
    """Not an error type the director could name in advance."""


@pytest.mark.parametrize("exc", [Surprise("bug"), KeyError("k"), ZeroDivisionError()])
def test_any_failure_in_deciding_falls_back_to_the_least_loaded(director, monkeypatch, exc):
    def broken(*a, **kw):
        raise exc

    monkeypatch.setattr("extproc.director.decide", broken)
    before = metrics.DECISION_ERRORS._value.get()
    fallback = metrics.DECISIONS.labels("fallback")._value.get()
    info = RequestInfo(path="/v1/chat/completions")
    assert director.route(info, BODY) in POOL
    assert metrics.DECISION_ERRORS._value.get() == before + 1
    assert metrics.DECISIONS.labels("fallback")._value.get() == fallback + 1
    assert director.pool.tickets.outstanding() == 1


def test_unknown_or_forged_tickets_release_and_eject_nothing(director):
    info = RequestInfo(path="/v1/chat/completions")
    chosen = director.route(info, BODY)
    before = metrics.UNKNOWN_TICKETS._value.get()
    for forged in ("", "1-2-3", info.ticket + "x"):
        assert not director.finished(forged, failed=True)
    assert metrics.UNKNOWN_TICKETS._value.get() == before + 3
    assert all(u.healthy for u in director.upstreams()) and director.pool.tickets.outstanding() == 1
    assert director.finished(info.ticket, failed=True)  # the real one acts, as the first of three in a row
    assert all(u.healthy for u in director.upstreams())
    for _ in range(2):
        again = RequestInfo(path="/v1/chat/completions")
        while director.route(again, BODY) != chosen:
            director.finished(again.ticket, failed=False)
            again = RequestInfo(path="/v1/chat/completions")
        director.finished(again.ticket, failed=True)
    assert [u.address for u in director.upstreams() if not u.healthy] == [chosen]


def _entry(code: int = 200, **flags: bool) -> accesslog_pb2.HTTPAccessLogEntry:
    e = accesslog_pb2.HTTPAccessLogEntry()
    e.response.response_code.CopyFrom(wrappers_pb2.UInt32Value(value=code))
    for name, v in flags.items():
        setattr(e.common_properties.response_flags, name, v)
    return e


@pytest.mark.parametrize(
    "entry,failed",
    [
        (_entry(200), False),
        (_entry(400), False),
        (_entry(500), False),  # the router answered: its workers' error, not the router's
        (_entry(502), True),
        (_entry(503), True),
        (_entry(504), True),
        (_entry(0, upstream_connection_failure=True), True),
        (_entry(0, upstream_connection_termination=True), True),
        (_entry(0, upstream_remote_reset=True), True),
        (_entry(0, downstream_connection_termination=True), False),  # the client left
        (_entry(504, upstream_request_timeout=True), True),  # the router left the request idle past the timeout
        (_entry(503, upstream_overflow=True), False),  # Envoy's circuit breaker, not the router
        (_entry(503, no_healthy_upstream=True), False),
        (_entry(0, local_reset=True), False),
        (_entry(0, upstream_remote_reset=True, downstream_remote_reset=True), False),  # the client reset first
    ],
)
def test_upstream_failed_reads_the_access_log_entry(entry, failed):
    assert upstream_failed(entry) is failed


def test_policy_has_no_defaults_of_its_own():
    with pytest.raises(TypeError):
        policy.PolicyConfig()  # type: ignore[call-arg]


def test_the_budget_holds_as_requests_are_inserted_and_wakes_the_sweeper():
    budget = 20_000
    d = Director(build({"upstreams": POOL, "max_tree_size": str(budget)}, env={}), seed=1)
    d.set_upstreams(POOL)
    woken = []
    d.wake_sweeper = lambda: woken.append(1)
    refused = metrics.INSERTS_REFUSED._value.get()
    for i in range(200):
        body = orjson.dumps({"messages": [{"role": "user", "content": f"{i} " + "z" * 1000}]})
        info = RequestInfo(path="/v1/chat/completions")
        d.route(info, body)
        d.finished(info.ticket, failed=False)
    # one insert (1,005 characters and a node) past the budget at most, whatever arrives between sweeps
    assert all(n <= budget + 1005 + 256 for n in d.tree.tenant_chars().values())
    assert woken and metrics.INSERTS_REFUSED._value.get() > refused
    for _ in d.evict_slices():
        pass
    assert all(n <= budget * 0.9 for n in d.tree.tenant_chars().values())


def test_partitions_from_clients_are_digests_and_bounded():
    d = Director(build({"upstreams": POOL, "max_partitions": "4"}, env={}), seed=1)
    d.set_upstreams(POOL)
    for i in range(50):
        body = orjson.dumps({"model": f"m{i}" + "x" * 100_000, "messages": [{"role": "user", "content": "hi"}]})
        d.route(RequestInfo(path="/v1/chat/completions"), body)
    assert d.tree.partitions() == 4
    assert all(len(p) == 32 for p in d.tree._roots)
    assert sum(d.tree.tenant_chars().values()) == 4 * (len("hi") + 256)


def test_duplex_streams_together_hold_no_more_than_the_cap():
    d = Director(build({"upstreams": POOL, "max_held_body_bytes": "1000"}, env={}), seed=1)
    d.set_upstreams(POOL)
    a, b = DuplexExchange(d, HEADERS), DuplexExchange(d, HEADERS)
    a.on_headers(False), b.on_headers(False)
    assert a.on_body(chunk(b"x" * 600, False)) == [] and d.held_body_bytes == 600
    not_held = metrics.BODIES_NOT_HELD._value.get()
    out = b.on_body(chunk(b"y" * 600, False))  # 1,200 would pass the cap: decided by load, streamed through
    assert out[0].request_headers.response.header_mutation.set_headers and b.decided
    assert out[1].request_body.response.body_mutation.streamed_response.body == b"y" * 600
    assert d.held_body_bytes == 600 and metrics.BODIES_NOT_HELD._value.get() == not_held + 1
    a.close()  # a's client went away mid-upload
    assert d.held_body_bytes == 0
    c = DuplexExchange(d, HEADERS)
    c.on_headers(False)
    c.on_body(chunk(b"z" * 600, False))
    c.on_body(chunk(b"z", True))
    assert d.held_body_bytes == 0  # let go once decided
