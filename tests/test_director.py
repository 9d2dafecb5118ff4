"""The request lifecycle without gRPC: the exchanges of both body modes over a real director."""

import orjson
import pytest
from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from google.protobuf import wrappers_pb2

from extproc import metrics, policy
from extproc.als import upstream_failed
from extproc.config import build
from extproc.director import Director, Outcome, RequestInfo
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
    assert director.finished(x.info.ticket, Outcome.OK)
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


@pytest.mark.parametrize("follow", ["true", "false"])
@pytest.mark.parametrize("exc", [Surprise("bug"), KeyError("k"), ZeroDivisionError()])
def test_any_failure_in_deciding_falls_back_to_the_least_loaded(monkeypatch, exc, follow):
    def broken(*a, **kw):
        raise exc

    # sessions followed (the default) decide through extproc.sessions, otherwise the director
    # calls the policy itself: the rule fails in either place
    director = Director(build({"upstreams": POOL, "move_evicted_sessions": follow}, env={}), seed=1)
    director.set_upstreams(POOL)
    monkeypatch.setattr("extproc.director.decide", broken)
    monkeypatch.setattr("extproc.sessions.decide", broken)
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
        assert not director.finished(forged, Outcome.FAILED)
    assert metrics.UNKNOWN_TICKETS._value.get() == before + 3
    assert all(u.healthy for u in director.upstreams()) and director.pool.tickets.outstanding() == 1
    assert director.finished(info.ticket, Outcome.FAILED)  # the real one acts, as the first of three in a row
    assert all(u.healthy for u in director.upstreams())
    for _ in range(2):
        again = RequestInfo(path="/v1/chat/completions")
        while director.route(again, BODY) != chosen:
            director.finished(again.ticket, Outcome.OK)
            again = RequestInfo(path="/v1/chat/completions")
        director.finished(again.ticket, Outcome.FAILED)
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
    assert (upstream_failed(entry) is not Outcome.OK) is failed


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
        d.finished(info.ticket, Outcome.OK)
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


def test_begin_reads_path_encoding_and_envoys_request_id():
    d = Director(build({"upstreams": POOL}, env={}))
    info = d.begin({":path": "/v1/completions", "content-encoding": "gzip", "x-request-id": "envoy-id"})
    assert (info.path, info.content_encoding, info.request_id, info.ticket) == ("/v1/completions", "gzip", "envoy-id", "")
    empty = d.begin({})
    assert (empty.path, empty.content_encoding, empty.request_id) == ("", None, "")


def test_a_gzip_body_is_routed_on_its_text(director):
    import gzip

    info = director.begin({":path": "/v1/completions", "content-encoding": "gzip"})
    director.route(info, gzip.compress(orjson.dumps({"prompt": "zipped prompt text"})))
    assert director.tree.match("", "zipped prompt text").matched == len("zipped prompt text")


def test_a_body_too_large_is_routed_by_load_and_learns_nothing(director):
    info = RequestInfo(path="/v1/chat/completions")
    assert director.route(info, None, body_too_large=True) in POOL
    assert director.tree.node_count() == 0 and director.tree.partitions() == 0


def test_models_never_share_prefixes(director):
    for model in ("m1", "m2"):
        director.route(RequestInfo(path="/v1/chat/completions"), orjson.dumps({"model": model, "messages": [{"role": "user", "content": "same words"}]}))
    assert director.tree.partitions() == 2


def test_explain_reports_every_field_and_inserts_nothing(director):
    import gzip

    body = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "w" * 300}]})
    info = RequestInfo(path="/v1/chat/completions")
    director.route(info, body)
    director.finished(info.ticket, Outcome.OK)  # no load left: the holder is the cheapest
    nodes = director.tree.node_count()
    e = director.explain("/v1/chat/completions", gzip.compress(body), "gzip")
    assert director.tree.node_count() == nodes
    assert e["reason"] == "cache_hit" and e["match_rate"] == 1.0 and e["text_characters"] == 300 == e["matched_characters"]
    assert e["routing_text_head"] == "w" * 200 and e["no_text_reason"] is None and len(e["partition"]) == 32
    rows = {u["address"]: u for u in e["upstreams"]}
    assert set(rows) == set(POOL) and rows[e["upstream"]]["matched_characters"] == 300
    other = next(a for a in POOL if a != e["upstream"])
    assert rows[other]["matched_characters"] == 0 and rows[other]["healthy"] is True and rows[other]["inflight"] == 0
    # the cost rule's terms: the other upstream would recompute all 300 characters, nothing is charged
    assert (rows[e["upstream"]]["recompute_characters"], rows[e["upstream"]]["cost"]) == (0, 0)
    assert (rows[other]["recompute_characters"], rows[other]["charged_requests"], rows[other]["cost"]) == (300, 0, 300)
    # the same body again repeats a whole stored prompt: a continuation, its holder free up to the knee
    assert e["continuation"] is True
    knee = max(director.cfg.inflight_slack, director.cfg.continuation_knee)
    for _ in range(knee + 2):  # the holder, loaded two requests beyond the knee
        director.pool.tickets.issue(e["upstream"], 0.0)
    rows = {u["address"]: u for u in director.explain("/v1/chat/completions", body)["upstreams"]}
    assert rows[e["upstream"]]["charged_requests"] == 2
    assert rows[e["upstream"]]["cost"] == 2 * director.cfg.inflight_cost_chars
    # a body sharing only its first characters (fewer than --continuation-tail) is not one: the holder
    # is charged from the least loaded (0) + slack
    assert director.cfg.continuation_tail > 20
    other_body = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "w" * 20 + "v" * 280}]})
    e2 = director.explain("/v1/chat/completions", other_body)
    assert e2["continuation"] is False
    assert {u["address"]: u for u in e2["upstreams"]}[e["upstream"]]["charged_requests"] == knee + 2 - director.cfg.inflight_slack
    # one that edits it 200 characters in (a turn editing its own history) is: charged beyond the knee
    assert director.cfg.continuation_tail <= 200
    edited = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "w" * 200 + "v" * 100}]})
    e3 = director.explain("/v1/chat/completions", edited)
    assert e3["continuation"] is True and {u["address"]: u for u in e3["upstreams"]}[e["upstream"]]["charged_requests"] == 2
    empty = director.explain("/v1/models", None)
    assert (empty["match_rate"], empty["reason"], empty["no_text_reason"]) == (0.0, "no_routing_text", "no_routing_endpoint")
    for u in director.pool.upstreams.values():
        u.active_ok = False
    assert director.explain("/v1/chat/completions", body)["reason"] == "no_healthy_upstream"


def test_a_routers_reported_workers_set_its_knee_in_decisions_and_in_explain(director):
    """The health checker's count of an upstream's workers reaches the request path: its continuing
    conversations stay home up to --continuation-knee per worker, and explain shows both terms."""
    history = "a conversation's history " * 20  # 500 characters: cheaper to rebuild than one request queued
    first = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": history}]})
    info = RequestInfo(path="/v1/chat/completions")
    home = director.route(info, first)
    director.finished(info.ticket, Outcome.OK)
    other = next(a for a in POOL if a != home)
    knee = director.cfg.continuation_knee
    assert director.record_workers(home, 3) and not director.record_workers(home, 3)
    assert not director.record_workers("10.9.9.9:1", 3)  # not in the pool: nothing kept
    for _ in range(3 * knee):
        director.pool.tickets.issue(home, 0.0)
    nxt = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": history}, {"role": "assistant", "content": "ok"},
                                                   {"role": "user", "content": "and then?"}]})
    rows = {u["address"]: u for u in director.explain("/v1/chat/completions", nxt)["upstreams"]}
    assert (rows[home]["workers"], rows[home]["continuation_knee"], rows[home]["charged_requests"]) == (3, 3 * knee, 0)
    assert (rows[other]["workers"], rows[other]["continuation_knee"]) == (0, knee)  # not known: one worker
    assert {u.address: u.workers for u in director.upstreams()} == {home: 3, other: 0}
    info = RequestInfo(path="/v1/chat/completions")
    assert director.route(info, nxt) == home  # 24 in flight, none elsewhere: still home
    director.finished(info.ticket, Outcome.OK)
    assert director.record_workers(home, None)  # the router stopped saying: one worker again
    info = RequestInfo(path="/v1/chat/completions")
    assert director.route(info, nxt) == other
    director.finished(info.ticket, Outcome.OK)
    director.record_workers(other, 2)
    director.set_upstreams([home])
    assert other not in director.pool.workers  # an upstream that left takes its count with it


def test_a_duplex_decision_learns_the_body_whether_it_ends_with_data_or_trailers(director):
    text = "a duplex prompt to remember"
    for ending in ("eos", "trailers"):
        x = DuplexExchange(director, HEADERS)
        x.on_headers(False)
        b = orjson.dumps({"model": ending, "messages": [{"role": "user", "content": text}]})
        x.on_body(chunk(b, ending == "eos"))
        out = x.on_trailers() if ending == "trailers" else []
        assert x.decided and director.held_body_bytes == 0
        if ending == "trailers":
            assert [r.WhichOneof("response") for r in out] == ["request_headers", "request_body", "request_trailers"]
            assert not out[1].request_body.response.body_mutation.streamed_response.end_of_stream
    assert director.tree.partitions() == 2 and all(n > len(text) for n in director.tree.tenant_chars().values())


def test_duplex_body_cap_boundary(director):
    director.reconfigure(build({"upstreams": POOL, "max_body_bytes": str(len(BODY))}, env={}))
    x = DuplexExchange(director, HEADERS)
    x.on_headers(False)
    assert x.on_body(chunk(BODY, False)) == []  # exactly the cap: still held
    y = DuplexExchange(director, HEADERS)
    y.on_headers(False)
    assert y.on_body(chunk(BODY + b" ", False))  # one byte more: decided by load now
    x.close()


def test_an_empty_last_chunk_still_ends_the_body(director):
    x = DuplexExchange(director, HEADERS)
    x.on_headers(False)
    x.on_body(chunk(BODY, False))
    out = x.on_body(chunk(b"", True))
    streamed = [r.request_body.response.body_mutation.streamed_response for r in out[1:]]
    assert b"".join(s.body for s in streamed) == BODY and streamed[-1].end_of_stream
    late = DuplexExchange(director, HEADERS)
    late.on_headers(False)
    late.on_body(chunk(BODY, False))
    late.on_trailers()
    assert late.on_body(chunk(b"", True))[0].request_body.response.body_mutation.streamed_response.end_of_stream


def test_the_decision_overwrites_and_clears_the_route_cache(director):
    x = BufferedExchange(director, HEADERS)
    common = x.on_body(chunk(BODY, True))[0].request_body.response
    assert common.clear_route_cache
    for h in common.header_mutation.set_headers:
        assert h.append_action == h.OVERWRITE_IF_EXISTS_OR_ADD


def test_headers_from_older_envoys_in_value_not_raw_value():
    from envoy.config.core.v3 import base_pb2

    from extproc.handlers import headers_dict

    msg = pb.HttpHeaders(headers=base_pb2.HeaderMap(headers=[
        base_pb2.HeaderValue(key=":path", value="/v1/old"), base_pb2.HeaderValue(key="x", raw_value="é".encode() + b"\xff")]))
    assert headers_dict(msg) == {":path": "/v1/old", "x": "é\ufffd"}


def test_reconfigure_reaches_tickets_and_tree(director):
    director.reconfigure(build({"upstreams": POOL, "inflight_timeout_secs": "7", "lost_report_grace_secs": "3", "max_partitions": "9"}, env={}))
    assert (director.pool.tickets.timeout, director.pool.tickets.grace, director.tree.max_partitions) == (7, 3, 9)


def test_learning_counts_refusals_and_dropped_partitions_exactly():
    d = Director(build({"upstreams": POOL, "max_tree_size": "2000", "max_partitions": "1"}, env={}), seed=1)
    d.set_upstreams(POOL)
    woken = []
    d.wake_sweeper = lambda: woken.append(1)
    refused, dropped = metrics.INSERTS_REFUSED._value.get(), metrics.PARTITIONS_DROPPED._value.get()
    d._learn("p1", "a" * 100, POOL[0])
    assert not woken and metrics.INSERTS_REFUSED._value.get() == refused
    d._learn("p1", "b" * (2000 - 100 - 2 * 256), POOL[0])  # exactly at the budget now (two nodes of 256)
    assert d.tree.held(POOL[0]) == 2000 and woken == [1]
    d._learn("p1", "c" * 10, POOL[0])
    assert metrics.INSERTS_REFUSED._value.get() == refused + 1
    d._learn("p2", "d", POOL[1])
    assert metrics.PARTITIONS_DROPPED._value.get() == dropped + 1


def test_a_sweep_counts_what_it_evicts_and_forgets_every_upstream_that_left(director):
    for i in range(30):
        director.tree.insert("", f"{i:02d} " + "q" * 100, POOL[0], float(i))
    director.tree.insert("", "gone one", "10.0.0.1:1", 0.0)
    director.tree.insert("", "gone two", "10.0.0.2:1", 0.0)
    director.reconfigure(build({"upstreams": POOL, "max_tree_size": "1000"}, env={}))
    before, held = metrics.EVICTED_CHARS._value.get(), director.tree.held(POOL[0])
    for _ in director.evict_slices(slice_secs=0.0):
        pass
    assert set(director.tree.tenant_chars()) == {POOL[0]}
    assert metrics.EVICTED_CHARS._value.get() - before == held - director.tree.held(POOL[0])


def test_a_refused_connection_ejects_at_once_other_failures_after_a_run(director):
    from extproc.als import upstream_failed as classify

    assert classify(_entry(503, upstream_connection_failure=True)) is Outcome.REFUSED
    assert classify(_entry(503)) is Outcome.FAILED
    info = RequestInfo(path="/v1/chat/completions")
    chosen = director.route(info, BODY)
    assert director.finished(info.ticket, Outcome.REFUSED)
    assert [u.address for u in director.upstreams() if not u.healthy] == [chosen]


def test_observed_hits_show_in_explain_and_tree(director):
    body = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "v" * 400}]})
    info = RequestInfo(path="/v1/chat/completions")
    director.route(info, body)
    assert director.tree_stats().observed_hit_ratio_per_upstream == {}
    info.sampled = True  # read as one of --observe-sample's share (observe_now), not for its session alone
    director.observed(info, 100, 80)
    director.observed(info, 100, 40)
    assert director.tree_stats().observed_hit_ratio_per_upstream == {info.upstream: 0.6}
    rows = {u["address"]: u for u in director.explain("/v1/chat/completions", body)["upstreams"]}
    assert (rows[info.upstream]["observed_hit_ratio"], rows[info.upstream]["observed_responses"]) == (0.6, 2)
    other = next(a for a in rows if a != info.upstream)
    assert rows[other]["observed_responses"] == 0


def test_continuations_are_counted_by_where_they_went(director):
    home = metrics.CONTINUATIONS.labels("home")._value.get()
    moved = metrics.CONTINUATIONS.labels("moved")._value.get()
    first = RequestInfo(path="/v1/chat/completions")
    director.route(first, BODY)
    director.finished(first.ticket, Outcome.OK)
    director.route(RequestInfo(path="/v1/chat/completions"), BODY)  # the same prompt again: a continuation, nothing in flight
    assert metrics.CONTINUATIONS.labels("home")._value.get() == home + 1
    assert metrics.CONTINUATIONS.labels("moved")._value.get() == moved
    director.route(RequestInfo(path="/v1/chat/completions"), orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "other"}]}))
    assert metrics.CONTINUATIONS.labels("home")._value.get() == home + 1  # a new prompt is not one
    # a turn that edits a stored conversation 200 characters in (past --continuation-tail) is one
    long = [{"role": "user", "content": "q" * 300}]
    director.route(RequestInfo(path="/v1/chat/completions"), orjson.dumps({"model": "m", "messages": long}))
    edited = [{"role": "user", "content": "q" * 200 + "edited"}]
    director.route(RequestInfo(path="/v1/chat/completions"), orjson.dumps({"model": "m", "messages": edited}))
    assert metrics.CONTINUATIONS.labels("home")._value.get() + metrics.CONTINUATIONS.labels("moved")._value.get() == home + moved + 2


def _session(system: str, user: str) -> bytes:
    return orjson.dumps({"model": "m", "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}]})


def _histogram(h) -> tuple[float, float]:
    return h._sum.get(), sum(b.get() for b in h._buckets)


def test_new_sessions_match_rate_is_observed_apart_from_continuations():
    """What an operator reads to set the routers' own threshold: new sessions' match rate, which
    continuations (matching their own history) and load-only decisions must not blur."""
    d = Director(build({"upstreams": POOL}, env={}), seed=1)
    d.set_upstreams(POOL)
    system = "s" * 400
    for user in ("a" * 200, "b" * 200):  # two sessions stored: a third stops where they branch
        info = RequestInfo(path="/v1/chat/completions")
        d.route(info, _session(system, user))
        d.finished(info.ticket, Outcome.OK)
    before = _histogram(metrics.NEW_SESSION_MATCH_RATE)
    info = RequestInfo(path="/v1/chat/completions")
    d.route(info, _session(system, "c" * 200))
    d.finished(info.ticket, Outcome.OK)
    total, count = _histogram(metrics.NEW_SESSION_MATCH_RATE)
    assert count == before[1] + 1
    assert total - before[0] == pytest.approx(info.matched / info.text_len) and 0.6 < info.matched / info.text_len < 0.7
    d.route(RequestInfo(path="/v1/chat/completions"), _session(system, "c" * 200 + " and more"))  # its next turn
    assert _histogram(metrics.NEW_SESSION_MATCH_RATE)[1] == count
    # a decision by load alone (imbalance) says nothing of where a prefix would go
    tight = Director(build({"upstreams": POOL, "balance_abs_threshold": "0", "balance_rel_threshold": "1.0"}, env={}), seed=1)
    tight.set_upstreams(POOL)
    tight.route(RequestInfo(path="/v1/chat/completions"), _session(system, "d" * 200))  # a new session (rate 0), stays in flight
    assert _histogram(metrics.NEW_SESSION_MATCH_RATE)[1] == count + 1
    imbalances = metrics.DECISIONS.labels("imbalance")._value.get()
    tight.route(RequestInfo(path="/v1/chat/completions"), _session("another system", "e" * 200))
    assert metrics.DECISIONS.labels("imbalance")._value.get() == imbalances + 1
    assert _histogram(metrics.NEW_SESSION_MATCH_RATE)[1] == count + 1


def _turns(system: str, steps: list[str]) -> bytes:
    """An agent session's prompt after ``steps`` (user and assistant messages alternating)."""
    messages = [{"role": "system", "content": system}]
    for i, step in enumerate(steps):
        messages.append({"role": "user" if i % 2 == 0 else "assistant", "content": step})
    return orjson.dumps({"model": "m", "messages": messages})


@pytest.mark.parametrize("evicted, moves, other_stream", [(True, 1, False), (False, 0, False), (True, 1, True)])
def test_a_session_moves_off_its_router_after_a_response_reports_its_history_evicted(evicted, moves, other_stream):
    """--move-evicted-sessions: the observed report of one turn (cached_tokens) decides the next,
    whether the response is read on the deciding stream (buffered mode) or on the observing
    filter's own stream, which knows the request by its id only (duplex mode)."""
    d = Director(build({"upstreams": POOL, "move_evicted_sessions": "true", "move_family_turns": "2", "observe_sample": "1"}, env={}), seed=1)
    d.set_upstreams(POOL)
    system = "You are an agent with these tools. " * 36  # 1,260 characters: a prediction long enough to judge
    for task in ("first task " * 30, "second task " * 30):  # two sessions stored: a third stops where they branch
        info = RequestInfo(path="/v1/chat/completions")
        d.route(info, _turns(system, [task]))
        d.finished(info.ticket, Outcome.OK)
    steps = ["third task " * 30]
    info = RequestInfo(path="/v1/chat/completions", request_id="req-3")
    home = d.route(info, _turns(system, steps))
    d.finished(info.ticket, Outcome.OK)
    assert info.session is not None
    if other_stream:
        d.observing(info)  # the deciding stream set the observe header
        info = RequestInfo(path="/v1/chat/completions", request_id="req-3", upstream=home, matched=info.matched, text_len=info.text_len)
    d.observed(info, 300, 10 if evicted else 290)  # the worker found 10 (or 290) of its 300 tokens
    assert not d.awaiting_reports
    before = metrics.SESSION_MOVES._value.get()
    steps += ["done: " + "output " * 500, "next step " * 40]  # the shared prompt now under 0.3 of it
    info = RequestInfo(path="/v1/chat/completions")
    there = d.route(info, _turns(system, steps))
    assert (there != home) == bool(moves)
    assert metrics.SESSION_MOVES._value.get() == before + moves
    # on by default; --no-move-evicted-sessions follows no session, so no report can move one
    assert Director(build({"upstreams": POOL}, env={}), seed=1).book is not None
    plain = Director(build({"upstreams": POOL, "observe_sample": "1", "move_evicted_sessions": "false"}, env={}), seed=1)
    assert plain.book is None


def test_explain_shows_the_move_a_session_is_due_and_changes_nothing_in_the_book():
    """``explain`` gives each term of --move-evicted-sessions for a request (its session's turn,
    shared prefix, family mean, latest report) and, for a turn that moves, the upstream it goes to:
    the one the real request then gets. A dry run counts nothing: the real decision after it is
    the one it would have been without it."""
    d = Director(build({"upstreams": POOL, "move_family_turns": "2"}, env={}), seed=1)
    d.set_upstreams(POOL)
    system = "You are an agent with these tools. " * 36
    for task in ("first task " * 30, "second task " * 30):
        info = RequestInfo(path="/v1/chat/completions")
        d.route(info, _turns(system, [task]))
        d.finished(info.ticket, Outcome.OK)
    steps = ["third task " * 30]
    first = _turns(system, steps)
    e = d.explain("/v1/chat/completions", first)["session"]
    assert (e["new"], e["turn"], e["over"], e["moves"]) == (True, 1, True, False) and e["shared"] > 1000
    info = RequestInfo(path="/v1/chat/completions")
    home = d.route(info, first)
    d.finished(info.ticket, Outcome.OK)
    info.sampled = True
    d.observed(info, 300, 10)  # evicted
    steps += ["done: " + "output " * 500, "next step " * 40]
    later = _turns(system, steps)
    for _ in range(2):  # asked twice: the first asking counted nothing
        e = d.explain("/v1/chat/completions", later)
        assert e["session"] == {"new": False, "turn": 2, "shared": e["session"]["shared"], "over": True, "family_turns": 2.0,
                                "evicted": True, "moved": False, "moves": True}
        assert e["upstream"] != home
    info = RequestInfo(path="/v1/chat/completions")
    assert d.route(info, later) == e["upstream"] and info.session.moved
    after = d.explain("/v1/chat/completions", _turns(system, steps + ["more"]))["session"]
    assert (after["turn"], after["moved"], after["moves"]) == (3, True, False)  # once
    d.book.sessions.clear()  # a session the book forgot (or began on another replica): not followed
    assert d.explain("/v1/chat/completions", _turns(system, steps + ["more"]))["session"] is None
    off = Director(build({"upstreams": POOL, "move_evicted_sessions": "false"}, env={}), seed=1)
    off.set_upstreams(POOL)
    assert off.explain("/v1/chat/completions", first)["session"] is None


def test_a_reload_starts_stops_and_retunes_the_session_book_keeping_its_sessions():
    d = Director(build({"upstreams": POOL, "move_evicted_sessions": "false"}, env={}), seed=1)
    d.set_upstreams(POOL)
    assert d.book is None
    d.reconfigure(build({"upstreams": POOL, "move_evicted_sessions": "true"}, env={}))
    book = d.book
    assert book is not None and book.family_turns == 6.0
    d.route(RequestInfo(path="/v1/chat/completions"), _turns("system " * 20, ["task " * 20]))
    d.reconfigure(build({"upstreams": POOL, "move_evicted_sessions": "true", "move_family_turns": "3", "cache_threshold": "0.5"}, env={}))
    assert d.book is book and (book.family_turns, book.threshold) == (3.0, 0.5) and book.kept == 1
    d.awaiting_reports["r"] = (next(iter(book.sessions.values()))[0], 1, False, None)
    d.reconfigure(build({"upstreams": POOL, "move_evicted_sessions": "false"}, env={}))
    assert d.book is None and not d.awaiting_reports


@pytest.mark.parametrize("following, peers", [(True, False), (False, False), (True, True)])
def test_in_duplex_mode_the_turns_a_report_could_move_are_read_and_no_others(following, peers):
    """--move-evicted-sessions without --observe-sample: in duplex mode the decision comes before
    the choice to read, so the director reads the responses of exactly the turns an eviction
    report may move (``SessionBook.worth_reading``: here the turn before the session is a
    candidate), and a session moves off its evicted pile with no other response read. With
    --no-move-evicted-sessions, nothing is read. With peers (--sync-url), the turns read keep the
    name the peers know their session by, and the report and the move go out as notes."""
    cfg = {"upstreams": POOL, "move_family_turns": "3"} | ({} if following else {"move_evicted_sessions": "false"})  # on by default
    d = Director(build(cfg, env={}), seed=1)
    d.set_upstreams(POOL)
    box = d.share() if peers else None
    system = "You are an agent with these tools. " * 36

    def turn(steps: list[str], request_id: str) -> tuple[DuplexExchange, bool]:
        x = DuplexExchange(d, {":path": "/v1/chat/completions", "x-request-id": request_id})
        x.on_headers(False)
        out = x.on_body(chunk(_turns(system, steps), True))
        d.finished(x.info.ticket, Outcome.OK)
        return x, any(h.header.key == "x-prefix-router-observe" for h in out[0].request_headers.response.header_mutation.set_headers)

    for i, task in enumerate(("first task " * 30, "second task " * 30)):
        assert not turn([task], f"a{i}")[1]  # a session's first turn: nothing to move yet
    steps = ["third task " * 30]
    first, read = turn(steps, "t1")
    assert not read and not d.awaiting_reports  # over the threshold on the shared prompt, but the prompt is still mostly it
    assert first.info.session_ref is None  # not read: no note can name it
    steps += ["done: " + "output " * 500, "next step " * 40]
    second, read = turn(steps, "t2")
    assert read == following
    if not following:
        return
    assert not d.book.candidate(second.info.session, second.info.text_len)  # a candidate from the next turn on
    ref = d.awaiting_reports["t2"][3]
    assert d.awaiting_reports["t2"] == (second.info.session, 2, False, ref)  # read for the book alone
    assert (ref is not None) == peers  # the name peers know the session by, when there are peers
    if peers:
        assert d.book.find(ref) is second.info.session
    home = second.info.upstream
    prompt_before = metrics.OBSERVED_PROMPT.labels(home)._value.get()
    d.observed(RequestInfo(path="/v1/chat/completions", request_id="t2", upstream=home, matched=second.info.matched,
                           text_len=second.info.text_len), 1400, 10)  # the observing stream's report: the history evicted
    # read for the book, not sampled: not a fair sample of the upstream's hits, so not in them
    assert d.observed_hits() == {} and metrics.OBSERVED_PROMPT.labels(home)._value.get() == prompt_before
    steps += ["done: " + "output " * 100, "next step " * 40]
    third, read = turn(steps, "t3")
    assert third.info.upstream != home and third.info.session.moved
    assert not read  # moved once: nothing of it is read again
    if peers:
        notes = box.take()[5]
        assert [(n.kind, n.anchor) for n in notes] == [("evicted", ref[3]), ("moved", ref[3])]
        assert d.book.find((notes[1].partition, notes[1].end, notes[1].tail, notes[1].anchor)) is third.info.session


def test_a_duplex_decision_that_will_be_observed_keeps_its_session_for_the_report():
    d = Director(build({"upstreams": POOL, "move_evicted_sessions": "true", "observe_sample": "1"}, env={}), seed=1)
    d.set_upstreams(POOL)
    x = DuplexExchange(d, {":path": "/v1/chat/completions", "x-request-id": "req-9"})
    x.on_headers(False)
    out = x.on_body(chunk(_turns("system " * 20, ["task " * 20]), True))
    assert any(h.header.key == "x-prefix-router-observe" for h in out[0].request_headers.response.header_mutation.set_headers)
    assert d.awaiting_reports["req-9"] == (x.info.session, 1, True, None)  # sampled


def test_a_sampled_buffered_response_counts_in_the_observed_hits_while_its_session_is_followed():
    """Buffered mode reads only what --observe-sample samples: with --move-evicted-sessions on, such
    a response both reaches its session and counts in the upstream's observed hit ratio."""
    d = Director(build({"upstreams": POOL, "move_evicted_sessions": "true", "observe_sample": "1"}, env={}), seed=1)
    d.set_upstreams(POOL)
    x = BufferedExchange(d, {":path": "/v1/chat/completions"})
    assert x.on_headers(False)[0].HasField("mode_override")  # sampled: the response is asked for
    x.on_body(chunk(_turns("system " * 20, ["task " * 20]), True))
    assert x.info.session is not None
    x.on_response_headers(pb.HttpHeaders())
    usage = {"usage": {"prompt_tokens": 60, "prompt_tokens_details": {"cached_tokens": 15}}}
    x.on_response_body(chunk(orjson.dumps(usage), True))
    assert d.observed_hits() == {x.info.upstream: (0.25, 1)}
    assert x.info.session.reported == 1


def _prompt(i: int) -> bytes:
    """A new long prompt of its own (a new system prompt): over --inflight-cost-chars, sharing not even its first
    character with the others (a shared character makes its holder cheaper: no tie)."""
    return orjson.dumps({"model": "m", "messages": [{"role": "system", "content": chr(ord("A") + i) + f" prompt number {i}. " * 100}]})


@pytest.mark.parametrize("seed", range(8))
def test_new_prefixes_spread_over_equally_loaded_upstreams(seed):
    """Idle upstreams, new long prompts one after another: each pair lands one on each upstream
    (random ties would put both of a pair on one half the time), and explain shows the count."""
    d = Director(build({"upstreams": POOL}, env={}), seed=seed)
    d.set_upstreams(POOL)
    for pair in range(3):
        got = []
        for i in range(2):
            info = RequestInfo(path="/v1/chat/completions")
            got.append(d.route(info, _prompt(2 * pair + i)))
            d.finished(info.ticket, Outcome.OK)
        assert sorted(got) == sorted(POOL), (pair, got, d.new_prefixes.counts)
    assert dict(d.new_prefixes.counts) == {a: 3 for a in POOL}
    e = d.explain("/v1/chat/completions", _prompt(20))
    assert e["new_prefix"] is True and {u["new_prefixes_lately"] for u in e["upstreams"]} == {3}
    assert d.explain("/v1/chat/completions", BODY)["new_prefix"] is False  # a short chat is not one
    d.new_prefixes.took(POOL[0])  # one more home there: charged as --new-prefix-weight requests
    e = d.explain("/v1/chat/completions", _prompt(20))
    terms = {u["address"]: (u["charged_requests"], u["cost"]) for u in e["upstreams"]}
    assert terms == {POOL[0]: (2, 2 * 1024), POOL[1]: (0, 0)} and e["upstream"] == POOL[1]
    d.reconfigure(build({"upstreams": POOL, "new_prefix_window": 0}, env={}))
    assert d.explain("/v1/chat/completions", _prompt(21))["new_prefix"] is False


def test_explain_calls_a_request_a_new_prefix_only_when_its_decision_weighed_it():
    """explain's ``new_prefix`` is the decision's own flag: a choice by load alone (imbalance) or by
    sglang-router's rule weighs no homes, so it must not say the homes were weighed."""
    tight = Director(build({"upstreams": POOL, "balance_abs_threshold": "0", "balance_rel_threshold": "1.0"}, env={}), seed=1)
    tight.set_upstreams(POOL)
    assert tight.explain("/v1/chat/completions", _prompt(1))["new_prefix"] is True  # balanced: the cost rule weighs it
    tight.route(RequestInfo(path="/v1/chat/completions"), BODY)  # one request in flight, never finished: imbalance
    e = tight.explain("/v1/chat/completions", _prompt(1))
    assert e["reason"] == "imbalance" and e["new_prefix"] is False
    creator = Director(build({"upstreams": POOL, "hit_choice": "creator"}, env={}), seed=1)
    creator.set_upstreams(POOL)
    e = creator.explain("/v1/chat/completions", _prompt(1))
    assert e["reason"] == "cache_miss" and e["new_prefix"] is False


@pytest.mark.parametrize("following", [True, False])
def test_a_peers_new_prefix_counts_here_too(following):
    """Replicas spread new prefixes over one count: a peer's placement of a new long prompt is
    counted for its upstream; its next turn (matching the first), a short prompt, or a placement for
    an upstream outside the pool are not."""
    from extproc.syncwire import Event, Placement

    d = Director(build({"upstreams": POOL, "move_evicted_sessions": following}, env={}), seed=0)
    d.set_upstreams(POOL)
    ri = d._routing_input("/v1/chat/completions", _prompt(1), None)
    short = d._routing_input("/v1/chat/completions", BODY, None)
    placements = (Placement(ri.partition, POOL[1], ri.text), Placement(ri.partition, POOL[1], ri.text + " and the next turn"),
                  Placement(short.partition, POOL[0], short.text), Placement(ri.partition, "10.9.9.9:1", ri.text[::-1]))
    d.learn_from(Event("peer", 1, 1, {}, placements))
    assert dict(d.new_prefixes.counts) == {POOL[1]: 1}


@pytest.mark.parametrize("seed", range(4))
def test_new_sessions_past_a_shared_system_prompt_spread_as_new_prefixes(seed):
    """Agent sessions, one after another on idle upstreams, share a system prompt and then bring a
    long task of their own (--new-prefix-own-chars): each such task is a home, so they spread over
    both upstreams and explain calls the next one a new prefix. Counting only texts that match
    nothing stored (0), every session stays with the system prompt's first holder: it costs
    nothing there and the prompt's rebuild anywhere else."""
    system = "You are an agent with these tools: search, edit, run. " * 6

    def task(i: int) -> str:
        return f"{chr(ord('a') + i)} task {i}: fix the failing test in module {i}. " * 30

    def placed(d: Director) -> list[str]:
        got = []
        for i in range(6):
            info = RequestInfo(path="/v1/chat/completions")
            got.append(d.route(info, _turns(system, [task(i)])))
            d.finished(info.ticket, Outcome.OK)
        return got

    d = Director(build({"upstreams": POOL}, env={}), seed=seed)
    d.set_upstreams(POOL)
    got = placed(d)
    assert set(got[2:]) == set(POOL), got  # from the third on (two stored sessions branch), spread
    assert d.explain("/v1/chat/completions", _turns(system, [task(9)]))["new_prefix"] is True
    # a task under 1,024 characters of its own is not one, however long the prompt with its system part
    assert d.explain("/v1/chat/completions", _turns(system, [task(9)[:900]]))["new_prefix"] is False
    old = Director(build({"upstreams": POOL, "new_prefix_own_chars": 0}, env={}), seed=seed)
    old.set_upstreams(POOL)
    got = placed(old)
    assert len(set(got)) == 1, got
