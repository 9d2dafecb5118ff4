"""The status page's data (extproc.status) and its access rules on the admin listener.

The page itself, in a real browser, is tested in tests/integration/test_status_page.py."""

import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer

from extproc import metrics
from extproc.admin import Admin
from extproc.config import build
from extproc.director import Director, Outcome, RequestInfo
from extproc.status import DecisionWindow, mask, refusal

A, B = "127.0.0.1:1", "127.0.0.1:2"


def test_a_window_counts_what_was_decided_since_the_newest_sample_old_enough():
    w = DecisionWindow(keep_secs=60, every=10)
    w.sample(0, {})
    w.sample(10, {(A, "prefix_match"): 4})
    w.sample(20, {(A, "prefix_match"): 6, (B, "least_loaded"): 1})
    totals = {(A, "prefix_match"): 9, (B, "least_loaded"): 3}
    assert w.since(25, 10, totals) == (15, {(A, "prefix_match"): 5, (B, "least_loaded"): 3})  # base: t=10
    assert w.since(25, 5, totals) == (5, {(A, "prefix_match"): 3, (B, "least_loaded"): 2})  # base: t=20
    # longer than the samples go back: everything since the first one, and the span says so
    assert w.since(25, 300, totals) == (25, totals)


def test_the_window_keeps_a_bounded_number_of_samples():
    w = DecisionWindow(keep_secs=60, every=10)
    for t in range(0, 10_000, 10):
        w.sample(t, {(A, "prefix_match"): t})
    assert len(w.samples) == 8
    span, counts = w.since(10_000, 60, {(A, "prefix_match"): 10_000})
    assert span == 60 and counts == {(A, "prefix_match"): 60}


def test_an_upstream_with_no_new_decisions_is_left_out():
    w = DecisionWindow()
    w.sample(0, {(A, "prefix_match"): 3})
    assert w.since(5, 60, {(A, "prefix_match"): 3}) == (5, {})


@pytest.mark.parametrize(
    "value, shown",
    [
        ("nats://alice:s3cret@nats.example:4222", "nats://***@nats.example:4222"),
        ("tls://tok@10.0.0.1:4222,nats://b:c@10.0.0.2", "tls://***@10.0.0.1:4222,nats://***@10.0.0.2"),
        (["nats://u:p@h"], ["nats://***@h"]),
        ("/etc/prefix-router/token", "/etc/prefix-router/token"),  # a path names a secret, it is not one
        ("user@example.com", "user@example.com"),
        (42, 42),
    ],
)
def test_credentials_in_urls_are_masked(value, shown):
    assert mask(value) == shown


@pytest.mark.parametrize(
    "peer, host, cidrs, expected",
    [
        ("127.0.0.1", "127.0.0.1:9464", None, None),
        ("127.0.0.1", "localhost:9464", None, None),
        ("::1", "[::1]:9464", None, None),
        ("::ffff:127.0.0.1", "localhost", None, None),
        ("10.1.2.3", "10.0.0.9:9464", None, "peer"),  # outside the default (loopback)
        ("10.1.2.3", "10.0.0.9:9464", "10.0.0.0/8", None),
        ("127.0.0.1", "rebind.attacker.example:9464", None, "host"),  # DNS rebinding
        ("127.0.0.1", "", None, "host"),
        (None, "localhost", None, "peer"),
    ],
)
def test_who_may_see_the_status_page(peer, host, cidrs, expected):
    cfg = build({"upstreams": [A], **({"status_allowed_cidrs": cidrs} if cidrs else {})}, env={})
    assert refusal(cfg, peer, host) == expected


def chat(text: str) -> bytes:
    return orjson.dumps({"model": "m", "messages": [{"role": "user", "content": text}]})


@pytest.fixture
async def admin():
    # no slack: three fresh conversations spread over both upstreams by load
    cfg = build({"upstreams": [A, B], "sync_url": "nats://alice:s3cret@127.0.0.1:4222", "inflight_slack": 0}, env={})
    d = Director(cfg, seed=1)
    d.set_upstreams([A, B])
    a = Admin(d, lambda: cfg)
    client = TestClient(TestServer(a.app()))
    await client.start_server()
    try:
        yield a, client
    finally:
        await client.close()


async def test_the_page_and_its_files_are_served_under_a_strict_policy(admin):
    _, client = admin
    r = await client.get("/")
    html = await r.text()
    assert r.status == 200 and r.content_type == "text/html"
    assert '<script src="status.js"' in html and "http" not in html.split("<body>")[1].replace('href="status.json"', "")
    csp = r.headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
    for path, ctype in (("/status.js", "text/javascript"), ("/status.css", "text/css")):
        r = await client.get(path)
        assert r.status == 200 and r.content_type == ctype and len(await r.read()) > 100


async def test_status_json_shows_each_upstream_its_decisions_and_the_masked_config(admin):
    a, client = admin
    d = a.director
    a.window.sample(0.0, d.decided)  # as the admin listener's sampler does at its start
    for i in range(3):
        d.route(RequestInfo(path="/v1/chat/completions"), chat(f"conversation {i} " * 20))
    doc = await (await client.get("/status.json")).json()
    assert [u["address"] for u in doc["upstreams"]] == [A, B]
    assert sum(u["inflight"] for u in doc["upstreams"]) == 3
    assert all(u["tree_characters"] > 0 for u in doc["upstreams"]) and doc["tree"]["stored_characters"] > 0
    assert abs(sum(u["tree_share"] for u in doc["upstreams"]) - 1) < 1e-9
    for w in doc["decisions"]:
        assert sum(n for per in w["by_upstream"].values() for n in per.values()) == 3
    assert doc["config"]["sync_url"] == "nats://***@127.0.0.1:4222"
    assert [u["observed_hit_ratio"] for u in doc["upstreams"]] == [None, None]  # nothing sampled yet
    info = RequestInfo(path="/v1/chat/completions")
    d.route(info, chat("sampled " * 30))
    info.sampled = True  # one of --observe-sample's share (observe_now)
    d.observed(info, 200, 150)
    doc = await (await client.get("/status.json")).json()
    row = next(u for u in doc["upstreams"] if u["address"] == info.upstream)
    assert (row["observed_hit_ratio"], row["observed_responses"]) == (0.75, 1)
    assert "s3cret" not in (await (await client.get("/status.json")).text())
    assert doc["sync"] is None  # no sync link given to this Admin
    d.pool.upstreams[A].eject(5.0, 60.0, __import__("time").monotonic())
    doc = await (await client.get("/status.json")).json()
    ua = doc["upstreams"][0]
    assert ua["ejected"] and not ua["healthy"] and 4.0 < ua["ejected_secs_left"] <= 5.0


def session(system: str, user: str) -> bytes:
    return orjson.dumps({"model": "m", "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}]})


async def test_status_json_counts_what_each_request_was_to_the_conversations_seen(admin):
    """The page's "Conversations" table: continuing turns apart from new sessions, and new sessions
    over the threshold (a shared prompt the routers would pile onto one worker) apart from others;
    each window's kinds add up to its decisions."""
    a, client = admin
    d = a.director
    a.window.sample(0.0, d.decided)
    system = "You are a careful assistant. " * 20  # 580 characters shared by the sessions below
    # the first is new (nothing matched); the second's match runs on into the one chain stored, so
    # it reads as that session going on (the tree cannot tell yet, policy.continues); once two
    # sessions branch after the system prompt, later ones stop there and read as new
    for user in ("first question " * 10, "second question " * 10, "third question " * 10):
        info = RequestInfo(path="/v1/chat/completions")
        d.route(info, session(system, user))
        d.finished(info.ticket, Outcome.OK)
    assert info.matched / info.text_len > 0.3
    info = RequestInfo(path="/v1/chat/completions")  # a fourth, with a long question of its own
    d.route(info, session(system, "x" * 2000))
    d.finished(info.ticket, Outcome.OK)
    assert 0 < info.matched / info.text_len <= 0.3
    info = RequestInfo(path="/v1/chat/completions")
    d.route(info, session(system, "first question " * 10 + "and its follow-up"))  # a next turn
    d.finished(info.ticket, Outcome.OK)
    d.route(RequestInfo(path="/v1/models"), None)  # no routing text: load alone
    doc = await (await client.get("/status.json")).json()
    assert doc["cache_threshold"] == 0.3
    for w in doc["decisions"]:
        assert w["sessions"] == {"continues": 2, "moved": 0, "new_over_threshold": 1, "new": 2, "load_only": 1}
        assert sum(w["sessions"].values()) == sum(n for per in w["by_upstream"].values() for n in per.values()) == 6
    # a kind adds up over upstreams and reasons: one more new session, at the other upstream
    d.decided[(B, "cache_miss", "new")] = d.decided.get((B, "cache_miss", "new"), 0) + 1
    doc = await (await client.get("/status.json")).json()
    assert [w["sessions"]["new"] for w in doc["decisions"]] == [3, 3, 3]
    assert [w["by_upstream"][B]["cache_miss"] for w in doc["decisions"]] == [1, 1, 1]


async def test_a_foreign_host_is_refused_and_counted_while_metrics_still_answer(admin):
    _, client = admin
    before = metrics.STATUS_DENIED.labels("host")._value.get()
    for path in ("/", "/status.json", "/status.js"):
        r = await client.get(path, headers={"Host": "rebind.attacker.example"})
        assert r.status == 403 and "Host" in await r.text()
    assert metrics.STATUS_DENIED.labels("host")._value.get() == before + 3
    assert (await client.get("/metrics", headers={"Host": "rebind.attacker.example"})).status == 200


async def test_a_client_outside_the_allowed_networks_is_refused():
    cfg = build({"upstreams": [A], "status_allowed_cidrs": "10.0.0.0/8"}, env={})
    d = Director(cfg)
    d.set_upstreams([A])
    client = TestClient(TestServer(Admin(d, lambda: cfg).app()))  # the test client comes from 127.0.0.1
    await client.start_server()
    try:
        r = await client.get("/status.json")
        assert r.status == 403 and "--status-allowed-cidrs" in await r.text()
        assert (await client.get("/readyz")).status == 200
    finally:
        await client.close()
