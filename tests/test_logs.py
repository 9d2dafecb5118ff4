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
    d.route(RequestInfo(path="/v1/chat/completions"), orjson.dumps({"prompt": "x"}))
    failed = [l for l in lines(captured) if l["event"] == "decision_failed"]
    assert failed and "ZeroDivisionError: planted" in json.dumps(failed[0]) and "Traceback" in json.dumps(failed[0])


def test_moving_sessions_without_reading_every_response_is_warned_of(captured):
    Director(build({"upstreams": ["127.0.0.1:1"], "move_evicted_sessions": "true", "observe_sample": "0.1"}, env={}))
    Director(build({"upstreams": ["127.0.0.1:1"], "move_evicted_sessions": "true", "observe_sample": "1"}, env={}))
    warned = [r for r in lines(captured) if r["event"] == "move_evicted_sessions_needs_every_response"]
    assert [r["observe_sample"] for r in warned] == [0.1]
