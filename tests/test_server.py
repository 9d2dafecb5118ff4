"""Reload and the admin listener, in process."""

import orjson
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families

from extproc import metrics
from extproc.admin import Admin
from extproc.config import ConfigError, build
from extproc.director import Director, RequestInfo
from extproc.pool import Pool
from extproc.server import Reloader, apply_config


def director(upstreams=("127.0.0.1:1", "127.0.0.1:2")) -> Director:
    cfg = build({"upstreams": list(upstreams)}, env={})
    return Director(cfg, Pool.from_addresses(list(upstreams)), seed=1)


def test_apply_config_changes_pool_and_thresholds_keeps_the_rest():
    d = director()
    d.tree.insert("", "kept text", "127.0.0.1:1", 0)
    d.tree.insert("", "dropped text", "127.0.0.1:2", 0)
    d.pool.acquire("t", "127.0.0.1:1")
    apply_config(d, build({"upstreams": ["127.0.0.1:1", "127.0.0.1:3"], "cache_threshold": "0.9"}, env={}))
    assert list(d.pool.upstreams) == ["127.0.0.1:1", "127.0.0.1:3"]
    assert d.policy.cache_threshold == 0.9
    assert d.tree.tenant_chars() == {"127.0.0.1:1": len("kept text")}
    assert d.pool.loads()["127.0.0.1:1"] == 1  # in flight survives


def test_failed_reload_keeps_the_running_config():
    d = director()

    def bad():
        raise ConfigError("--cache-threshold: must be <= 1.0, got '7'")

    before = metrics.RELOADS.labels("failed")._value.get()
    assert not Reloader(d, bad).reload()
    assert metrics.RELOADS.labels("failed")._value.get() == before + 1
    assert not Reloader(d, lambda: build({"upstreams": []}, env={})).reload()
    assert list(d.pool.upstreams) == ["127.0.0.1:1", "127.0.0.1:2"]


async def test_admin_endpoints():
    d = director()
    metrics.register_state(d)
    d.route(RequestInfo(path="/v1/completions", ticket="t1"), orjson.dumps({"prompt": "hello"}))
    client = TestClient(TestServer(Admin(d).app()))
    await client.start_server()
    try:
        assert (await client.get("/healthz")).status == 200
        assert (await client.get("/readyz")).status == 200
        text = await (await client.get("/metrics")).text()
        names = {s.name for f in text_string_to_metric_families(text) for s in f.samples}
        assert {"prefix_router_decisions_total", "prefix_router_inflight_requests", "prefix_router_tree_characters",
                "prefix_router_decision_seconds_bucket", "prefix_router_upstream_healthy"} <= names
        for u in d.pool.upstreams.values():
            u.healthy = False
        r = await client.get("/readyz")
        assert r.status == 503 and (await r.json())["healthy"] == 0
    finally:
        await client.close()
