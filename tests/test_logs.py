"""What the logs keep and what they never hold."""

import io
import json
import sys

import orjson
import pytest
import structlog

from extproc import logs
from extproc.config import build
from extproc.director import Director, RequestInfo
from extproc.handlers import BufferedExchange, DuplexExchange
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb


@pytest.fixture
def captured(monkeypatch):
    out = io.StringIO()
    monkeypatch.setattr(sys, "stderr", out)
    logs.configure("debug", "json")
    structlog.configure(cache_logger_on_first_use=False)  # each test binds to its own buffer
    yield out
    structlog.reset_defaults()


def lines(out: io.StringIO) -> list[dict]:
    return [json.loads(l) for l in out.getvalue().splitlines() if l.startswith("{")]


def test_a_bad_request_logs_its_path_without_the_query_string(captured):
    d = Director(build({"upstreams": ["127.0.0.1:1"]}, env={}))
    d.set_upstreams(["127.0.0.1:1"])
    d.route(RequestInfo(path="/v1/chat/completions?api_key=sk-secret&x=1", request_id="r1"), b"{not json")
    logged = [l for l in lines(captured) if l["event"] == "no_routing_text"]
    assert logged and logged[0]["path"] == "/v1/chat/completions"
    assert "sk-secret" not in captured.getvalue()


def test_json_logs_keep_the_traceback(captured, monkeypatch):
    d = Director(build({"upstreams": ["127.0.0.1:1"]}, env={}))
    d.set_upstreams(["127.0.0.1:1"])

    def broken(*a, **kw):
        raise ZeroDivisionError("planted")

    monkeypatch.setattr("extproc.director.decide", broken)
    monkeypatch.setattr("extproc.sessions.decide", broken)  # sessions followed (the default) decide there
    d.route(RequestInfo(path="/v1/chat/completions"), orjson.dumps({"prompt": "x"}))
    failed = [l for l in lines(captured) if l["event"] == "decision_failed"]
    assert failed and "ZeroDivisionError: planted" in json.dumps(failed[0]) and "Traceback" in json.dumps(failed[0])


def test_moving_sessions_in_buffered_mode_without_reading_every_response_is_said_once(captured):
    """In buffered mode the choice to read a response comes before the decision, so
    --move-evicted-sessions reads only what --observe-sample samples there: said on the first
    buffered stream, once; duplex streams (which read the turns that matter) and a service reading
    every response say nothing."""
    def warned() -> list[float]:
        return [r["observe_sample"] for r in lines(captured) if r["event"] == "move_evicted_sessions_buffered_reads_sample_only"]

    said = []
    for sample in ("0.1", "1"):
        d = Director(build({"upstreams": ["127.0.0.1:1"], "observe_sample": sample}, env={}))  # sessions followed by default
        d.set_upstreams(["127.0.0.1:1"])
        for _ in range(3):
            x = DuplexExchange(d, {":path": "/v1/chat/completions"})
            x.on_headers(False)
            x.on_body(pb.HttpBody(body=orjson.dumps({"prompt": "a task " * 50}), end_of_stream=True))  # decided, then asked whether to read
        assert warned() == said
        for _ in range(3):
            BufferedExchange(d, {":path": "/v1/chat/completions"}).on_headers(False)
        said = warned()
    assert said == [0.1]
