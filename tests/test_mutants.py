"""Tests written from surviving mutants (make mutants): each pins a behaviour no other test did."""

import random

import orjson
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from extproc import metrics
from extproc.config import build, policy_config
from extproc.director import Director, Outcome, RequestInfo
from extproc.handlers import DuplexExchange, _body_chunks
from extproc.policy import decide, is_imbalanced
from extproc.tree import NODE_CHARS, RadixTree
from extproc.upstream import Upstream

POOL = ["127.0.0.1:1", "127.0.0.1:2"]
HEADERS = {":path": "/v1/chat/completions"}


def director(**flags) -> Director:
    d = Director(build({"upstreams": POOL, **flags}, env={}), seed=3)
    d.set_upstreams(POOL)
    return d


def chat(text: str, model: str = "m") -> bytes:
    return orjson.dumps({"model": model, "messages": [{"role": "user", "content": text}]})


def chunk(data: bytes, eos: bool) -> pb.HttpBody:
    return pb.HttpBody(body=data, end_of_stream=eos)


def test_a_repeated_prompt_is_a_hit_in_its_own_partition():
    d = director()
    for _ in range(2):
        info = RequestInfo(path="/v1/chat/completions")
        hits = metrics.DECISIONS.labels("cache_hit")._value.get()
        d.route(info, chat("the same long prompt " * 10))
        d.finished(info.ticket, Outcome.OK)
    assert metrics.DECISIONS.labels("cache_hit")._value.get() == hits + 1


def test_decision_metrics_observe_time_and_match_rate():
    d = director()
    text = "measured prompt " * 10
    info = RequestInfo(path="/v1/chat/completions")
    d.route(info, chat(text))
    d.finished(info.ticket, Outcome.OK)
    secs, rate = metrics.DECISION_SECONDS._sum.get(), metrics.MATCH_RATE._sum.get()
    d.route(RequestInfo(path="/v1/chat/completions"), chat(text))
    assert 0 < metrics.DECISION_SECONDS._sum.get() - secs < 1.0
    assert metrics.MATCH_RATE._sum.get() - rate == pytest.approx(1.0)


def test_the_fallback_honours_tie_break_first(monkeypatch):
    d = director(tie_break="first")
    monkeypatch.setattr("extproc.director.decide", lambda *a, **k: 1 / 0)
    monkeypatch.setattr("extproc.director.log.exception", lambda *a, **k: None)
    picks = set()
    for i in range(5):
        info = RequestInfo(path="/v1/chat/completions")
        picks.add(d.route(info, chat(f"x{i}")))
        d.finished(info.ticket, Outcome.OK)
    assert picks == {POOL[0]}


def test_tickets_and_losses_carry_times_that_expiry_can_compare():
    d = director(inflight_timeout_secs="0.001")
    d.route(RequestInfo(path="/v1/chat/completions"), chat("t"))
    d.reports_lost()
    import time

    time.sleep(0.01)
    d.expire()
    assert d.pool.tickets.outstanding() == 0


def test_prompt_text_reaches_the_log_only_with_log_prompts(monkeypatch):
    seen = []
    monkeypatch.setattr("extproc.director.log.debug", lambda event, **kw: seen.append(event))
    director().route(RequestInfo(path="/v1/chat/completions"), chat("private words"))
    assert "routing_text" not in seen
    director(log_prompts="true").route(RequestInfo(path="/v1/chat/completions"), chat("shared words"))
    assert "routing_text" in seen


def test_a_second_partition_drop_is_counted_once():
    d = director(max_partitions="1")
    dropped = metrics.PARTITIONS_DROPPED._value.get()
    for model in ("a", "b", "c"):
        d.route(RequestInfo(path="/v1/chat/completions"), chat("hello", model))
    assert metrics.PARTITIONS_DROPPED._value.get() == dropped + 2 and d.tree.partitions_dropped == 2


def test_finishing_a_request_of_an_upstream_that_left_releases_it_and_ejections_are_labelled():
    d = director(ejection_failure_threshold="1")
    info = RequestInfo(path="/v1/chat/completions")
    chosen = d.route(info, chat("x"))
    d.set_upstreams([a for a in POOL if a != chosen])
    assert d.finished(info.ticket, Outcome.FAILED) and d.pool.tickets.outstanding() == 0
    d.set_upstreams(POOL)
    info = RequestInfo(path="/v1/chat/completions")
    chosen = d.route(info, chat("y"))
    before = metrics.EJECTIONS.labels(chosen)._value.get()
    d.finished(info.ticket, Outcome.FAILED)
    assert metrics.EJECTIONS.labels(chosen)._value.get() == before + 1


def test_tree_stats_fields():
    d = director()
    d.route(RequestInfo(path="/v1/chat/completions"), chat("stats"))
    s = d.tree_stats()
    assert (s.stored_characters, s.nodes, s.max_tree_size) == (5, 2, 67108864) and list(s.characters_per_upstream.values()) == [5 + NODE_CHARS]


def test_a_sweep_under_budget_counts_nothing():
    d = director()
    d.route(RequestInfo(path="/v1/chat/completions"), chat("small"))
    before = metrics.EVICTED_CHARS._value.get()
    for _ in d.evict_slices():
        pass
    assert metrics.EVICTED_CHARS._value.get() == before


def test_held_bytes_boundary_and_a_refused_last_chunk_ends_the_body_and_learns_nothing():
    d = director(max_held_body_bytes="1000")
    a = DuplexExchange(d, HEADERS)
    a.on_headers(False)
    assert a.on_body(chunk(b"x" * 1000, False)) == [] and d.held_body_bytes == 1000  # exactly the cap is allowed
    b = DuplexExchange(d, HEADERS)
    b.on_headers(False)
    out = b.on_body(chunk(chat("partial prompt"), True))  # refused, and it was the last chunk
    assert out[-1].request_body.response.body_mutation.streamed_response.end_of_stream
    assert d.tree.node_count() == 0  # decided by load: nothing learnt from a body not held
    a.close()
    b.close()
    assert d.held_body_bytes == 0


def test_trailers_after_the_decision_decide_nothing_again_and_multi_chunk_bodies_are_joined():
    d = director()
    x = DuplexExchange(d, HEADERS)
    x.on_headers(False)
    body = chat("joined from three chunks")
    x.on_body(chunk(body[:10], False))
    x.on_body(chunk(body[10:20], False))
    x.on_body(chunk(body[20:], True))
    assert d.pool.tickets.outstanding() == 1
    assert [r.WhichOneof("response") for r in x.on_trailers()] == ["request_trailers"]
    assert d.pool.tickets.outstanding() == 1  # no second decision
    x.close()
    assert d.held_body_bytes == 0
    assert d.tree.match(next(iter(d.tree._roots)), "joined from three chunks").matched == len("joined from three chunks")


def test_body_chunks_of_an_empty_body():
    assert _body_chunks([], False) == []
    [only] = _body_chunks([b""], True)
    s = only.request_body.response.body_mutation.streamed_response
    assert (s.body, s.end_of_stream) == (b"", True)


def test_imbalance_is_a_difference_not_a_sum():
    cfg = policy_config()
    assert not is_imbalanced({"a": 60, "b": 10}, cfg)


def test_least_loaded_hit_choice_honours_tie_break_first():
    tree = RadixTree()
    for t in ("b", "a"):
        tree.insert("m", "shared prefix here", t, 0)
    cfg = policy_config(hit_choice="least_loaded", tie_break="first")
    picks = {decide(tree, {"a": 0, "b": 0}, "m", "shared prefix here!", 1.0, cfg, random.Random(s), insert=False).upstream for s in range(6)}
    assert picks == {"b"}  # the first holder (the node's creation order), never a random draw


def test_cost_rule_charges_the_full_match_to_an_upstream_without_one():
    tree = RadixTree()
    tree.insert("m", "x", "a", 0)
    cfg = policy_config(tie_break="first")
    assert decide(tree, {"b": 0, "a": 0}, "m", "xyz", 1.0, cfg, random.Random(0), insert=False).upstream == "a"


def test_cost_rule_ties_are_drawn_at_random_by_default():
    picks = {decide(RadixTree(), {"a": 0, "b": 0}, "m", "q", 1.0, policy_config(), random.Random(s), insert=False).upstream for s in range(20)}
    assert picks == {"a", "b"}


def test_after_an_ejection_the_count_of_failures_starts_again():
    u = Upstream("a:1")
    for _ in range(3):
        u.request_failed(3, base=2, cap=5, now=0)
    assert not u.healthy
    u.record_check(True, 3, 2, now=10)
    assert u.healthy
    u.request_failed(3, base=2, cap=5, now=11)
    u.request_failed(3, base=2, cap=5, now=11)
    assert u.healthy  # two failures since the comeback: not yet
    u.succeeded()  # a request sent before finishing well while healthy resets the back-off
    assert u.ejections == 0


def test_a_success_while_ejected_keeps_the_back_off():
    u = Upstream("a:1")
    u.eject(base=2, cap=60, now=0)
    u.succeeded()  # a request sent before the ejection finished well
    u.record_check(True, 3, 2, now=3)
    assert u.eject(base=2, cap=60, now=4) == 4  # doubled: the success during the ejection did not reset it


def test_held_and_eviction_return_values():
    t = RadixTree()
    assert t.held("nobody") == 0
    t.insert("", "abc", "A", 1)
    assert t.evict("A", 10_000) == 0  # under budget: nothing removed


def test_pool_keeps_each_upstreams_state_across_a_new_list_and_passes_its_timeouts():
    from extproc.pool import Pool

    pool = Pool(inflight_timeout=10, lost_report_grace=5)
    assert (pool.tickets.timeout, pool.tickets.grace) == (10, 5)
    pool.set_addresses(["a:1", "b:1"])
    pool.upstreams["a:1"].eject(base=2, cap=5, now=0)
    pool.tickets.issue("b:1", now=0)
    pool.set_addresses(["b:1", "a:1", "c:1"])
    assert pool.upstreams["a:1"].ejected and pool.upstreams["c:1"].address == "c:1"
    assert (pool.inflight("b:1"), pool.inflight("a:1")) == (1, 0)


def test_active_check_counters_restart_after_every_change():
    u = Upstream("a:1")
    for ok in (False, False, True, False, False):
        u.record_check(ok, 3, 2, now=0)
    assert u.healthy  # the success in between started the failure count again
    u.record_check(False, 3, 2, now=0)
    assert not u.healthy
    u.record_check(True, 3, 2, now=0)
    u.record_check(True, 3, 2, now=0)
    assert u.healthy
    for _ in range(3):
        u.record_check(False, 3, 2, now=0)
    assert u.record_check(True, 3, 2, now=0) is None and not u.healthy  # two successes again, not one


def test_an_ejection_ends_exactly_at_its_time():
    u = Upstream("a:1")
    u.eject(base=2, cap=5, now=0)
    assert u.record_check(True, 3, 2, now=2.0) is True


def test_payload_edges():
    from extproc.config import DEFAULTS
    from extproc.payload import partition_key, routing_input

    def ri(path, doc, **kw):
        return routing_input(path, orjson.dumps(doc) if not isinstance(doc, bytes) else doc, **{**DEFAULTS.parse_options(), **kw})

    assert ri("/v1/completions", {"prompt": "plain"}, content_encoding="identity").text == "plain"
    assert partition_key({"model": 5, "lora_path": None}) == ""
    weird = partition_key({"model": "\ud800"})  # a lone surrogate cannot be JSON: still a digest
    assert len(weird) == 32 and weird != partition_key({"model": "\ud801"})
    msgs = [5, {"role": "user", "content": ["part", 5, {"type": "text", "text": "t"}], "reasoning_content": 7}, {"content": "after"}]
    assert ri("/v1/chat/completions", {"messages": msgs}).text == "part t after"
    legacy = ri("/v1/chat/completions", {"functions": [{"name": "f"}], "messages": [{"role": "user", "content": "x"}]}, form="template").text
    assert '<|im_start|>tools\n{"name":"f"}' in legacy


def test_the_upstream_view_the_admin_api_and_metrics_read():
    d = director()
    info = RequestInfo(path="/v1/chat/completions")
    chosen = d.route(info, chat("view me"))
    d.pool.upstreams[chosen].eject(base=2, cap=5, now=0)
    other = next(a for a in POOL if a != chosen)
    d.pool.upstreams[other].active_ok = False
    views = {v.address: v for v in d.upstreams()}
    assert (views[chosen].ejected, views[chosen].active_ok, views[chosen].inflight, views[chosen].tree_characters) == (True, True, 1, 7 + NODE_CHARS)
    assert (views[other].ejected, views[other].active_ok, views[other].inflight, views[other].tree_characters) == (False, False, 0, 0)


def test_set_upstreams_says_what_changed():
    d = director()
    assert d.set_upstreams(POOL) == ([], [])
    assert d.set_upstreams([POOL[1], "127.0.0.1:3"]) == (["127.0.0.1:3"], [POOL[0]])


def test_the_directors_health_checks_use_both_thresholds():
    d = director(health_failure_threshold="2", health_success_threshold="3")
    a = POOL[0]
    assert d.record_check(a, False) is None and d.record_check(a, False) is False
    assert d.record_check(a, True) is None and d.record_check(a, True) is None and d.record_check(a, True) is True
    assert d.record_check("10.9.9.9:1", True) is None  # not in the pool


def test_learning_a_text_already_held_is_not_a_refusal():
    d = director()
    refused = metrics.INSERTS_REFUSED._value.get()
    for _ in range(3):
        d._learn("p", "exactly the same text", POOL[0])
    assert metrics.INSERTS_REFUSED._value.get() == refused


def test_a_conversation_of_system_messages_only():
    from extproc.payload import render_chat_template

    assert render_chat_template([{"role": "system", "content": "a"}, {"role": "developer", "content": "b"}]) == (
        "<|im_start|>system\na<|im_end|>\n<|im_start|>developer\nb<|im_end|>\n")


def test_a_sweep_goes_on_past_a_collected_leaf_that_grew_a_child():
    t = RadixTree()
    for i, name in enumerate(("aa", "bb", "cc")):
        t.insert("", name * 10, "A", float(i + 1))
    budget = t.held("A") - 2 * (20 + NODE_CHARS)
    gen = t.evict_steps("A", budget, step=1)
    for _ in range(4):
        next(gen)
    t.insert("", "aa" * 10 + "tail", "A", 10.0)  # "aa…" is no longer a leaf: a child holds the newest text
    for _ in gen:
        pass
    # past the stale entry, both older leaves went; the grown branch (used last) stays
    assert t.match("", "bb" * 10).matched == 0 and t.match("", "cc" * 10).matched == 0
    assert t.match("", "aa" * 10 + "tail").matched == 24


def test_tickets_at_risk_are_released_only_after_the_whole_grace():
    from extproc.inflight import Tickets

    t = Tickets(timeout=100, grace=5)
    t.issue("a:1", now=18)
    t.reports_lost(now=20)
    assert t.expire(now=25) == 0  # the loss is exactly the grace old
    assert t.expire(now=25.01) == 1


def _parse(body: bytes, **kw):
    from extproc.config import DEFAULTS
    from extproc.payload import routing_input

    return routing_input(kw.pop("path", "/v1/completions"), body, **{**DEFAULTS.parse_options(), **kw})


def test_nesting_deep_enough_to_exhaust_the_extractor_is_too_deep_not_a_crash():
    n = 500  # within orjson's 1,024 levels, past Python's recursion limit in the extractor
    body = b'{"messages":[{"role":"user","content":[' + b'{"type":"tool_result","content":[' * n + b'{"type":"text","text":"x"}' + b"]}" * n + b"]}]}"
    assert _parse(body, path="/v1/chat/completions").reason == "too_deep"


def test_body_caps_are_inclusive_and_encodings_are_named():
    import gzip
    import zlib

    body = b'{"prompt": "' + b"p" * 100 + b'"}'
    cap = len(body)
    assert _parse(body, max_body_bytes=cap).text == "p" * 100  # exactly the cap: parsed
    assert _parse(body + b" ", max_body_bytes=cap).reason == "body_too_large"
    assert _parse(gzip.compress(body), content_encoding="gzip", max_body_bytes=cap).text == "p" * 100
    assert _parse(gzip.compress(body + b" "), content_encoding="gzip", max_body_bytes=cap).reason == "body_too_large"
    assert _parse(gzip.compress(body), content_encoding="x-gzip").text == "p" * 100
    assert _parse(zlib.compress(body), content_encoding="deflate").text == "p" * 100
    assert _parse(body, content_encoding="br").reason == "unsupported_encoding"
    assert _parse(b"not compressed at all", content_encoding="gzip").reason == "bad_encoding"


def test_the_container_cap_counts_objects_and_arrays_and_is_inclusive():
    arrays = b'{"prompt": [' + b",".join([b"[]"] * 9) + b']}'  # 1 object + 10 arrays = 11 containers
    assert _parse(arrays, max_json_containers=11).reason == "no_text"  # parsed: exactly the cap
    assert _parse(arrays, max_json_containers=10).reason == "too_complex"


def test_the_grace_and_the_clock_reach_tickets_and_health_from_the_start():
    d = director(lost_report_grace_secs="3")
    assert d.pool.tickets.grace == 3
    a = POOL[0]
    d.pool.upstreams[a].eject(base=0.0, cap=0.0, now=0)
    assert d.record_check(a, True) is True  # compares against the real clock, not None


def test_paths_with_several_query_or_fragment_marks():
    from extproc.payload import classify_path

    assert classify_path("/v1/chat/completions?a=1?b=2") == "chat"
    assert classify_path("/v1/completions#x#y") == "completions"


def test_decompression_stops_at_the_cap_instead_of_inflating_everything():
    import gzip
    import tracemalloc

    bomb = gzip.compress(b"{" + b" " * 50_000_000 + b"}")  # 50 MB of spaces in ~50 KB
    _parse(bomb, content_encoding="gzip", max_body_bytes=1_000_000)  # warm up
    tracemalloc.start()
    try:
        r = _parse(bomb, content_encoding="gzip", max_body_bytes=1_000_000)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert r.reason == "body_too_large" and peak < 5_000_000
