"""bench.cpu's set-ups measure what they say: the floor answers exactly as the service does."""

import asyncio

from bench.cpu import _aiter, _Floor, _in_process_answers, bodies, request_messages, ticket_of


def test_the_floor_replays_the_services_own_answer():
    answers = asyncio.run(_in_process_answers())
    # duplex: the decision answers the headers, then the held body streams back
    assert [a.WhichOneof("response") for a in answers] == ["request_headers", "request_body"]
    assert ticket_of(answers)  # routed to an upstream, not refused

    async def floor_answers(body):
        return [r async for r in _Floor(answers).Process(_aiter(request_messages(body)), None)]

    assert asyncio.run(floor_answers(bodies(1)[0])) == answers


def test_the_requests_are_conversations_that_grow():
    import orjson

    payloads = bodies(64)
    turns = [len(orjson.loads(p)["messages"]) for p in payloads]
    # 16 sessions take turns: each session's next request extends its last one
    assert turns[16] == turns[0] + 2 and payloads[16].startswith(payloads[0][:-2])


def test_the_floor_behind_envoy_routes_where_it_is_told():
    """bench.overhead puts the floor behind a real Envoy: its answers must pin each request to the
    benchmark's own upstreams (else Envoy would reach for addresses nobody listens on)."""
    upstreams = ["127.0.0.1:41001", "127.0.0.1:41002"]
    answers = asyncio.run(_in_process_answers(upstreams))
    hosts = [(h.header.raw_value or h.header.value.encode()).decode() for h in answers[0].request_headers.response.header_mutation.set_headers
             if h.header.key == "x-upstream-host"]
    assert len(hosts) == 1 and hosts[0] in upstreams


def test_the_report_says_how_far_the_service_sits_above_the_floor(tmp_path, monkeypatch):
    import json

    import bench.eval as ev

    row = {"path": "envoy-direct", "connections": 1, "rps": 3600.0, "p50_ms": 0.25, "p99_ms": 0.5, "added_p50_ms": 0.0, "throughput_vs_direct": 1.0}
    through = {**row, "path": "envoy+prefix-router duplex", "fallback_share": 0.0004}
    overhead = {"targets": {"added_p50_ms_max": 1.0, "throughput_vs_direct_min": 0.6}, "rows": [row, through],
                "duplex_above_grpc_floor_p50_ms": {"1": 0.17, "16": 1.97}}
    monkeypatch.setattr(ev, "RESULTS", tmp_path)
    (tmp_path / "overhead.json").write_text(json.dumps(overhead))
    text = "\n".join(ev._measured_sections())
    assert "p50: +0.17 ms at 1 connection, +1.97 ms at 16 connections." in text
    # each row through ext_proc says how much of it failed open; a path without ext_proc says nothing
    assert "| envoy+prefix-router duplex | 1 | 3600 | 0.25 | 0.50 | +0.00 | 100% | 0.04 % |" in text
    assert "| envoy-direct | 1 | 3600 | 0.25 | 0.50 | +0.00 | 100% | – |" in text


def test_each_overhead_row_says_how_much_of_it_failed_open(monkeypatch):
    """A request that fails open takes the fallback route, without ext_proc, and is fast: a row
    that silently measured it would flatter the service. Each row through a stack carries the share
    of its requests Envoy sent to the fallback cluster; no count at all is a benchmark bug."""
    import pytest

    import bench.overhead as ov

    counts = iter([(100, 5), (190, 15), (0, 0), (0, 0)])  # (pinned, fallback) before and after each run
    monkeypatch.setattr(ov, "_routed", lambda stack: next(counts))
    monkeypatch.setattr(ov, "_measure", lambda *a: {"p50_ms": 1.0})
    assert ov._measure_stack(None, "url", 1, 1, None)["fallback_share"] == pytest.approx(0.1)
    with pytest.raises(RuntimeError):
        ov._measure_stack(None, "url", 1, 1, None)
