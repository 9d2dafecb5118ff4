"""Operability through the real stack: metrics after traffic, JSON logs, readiness, reload under traffic."""

import concurrent.futures
import json
import os
import signal
import threading
import time
from pathlib import Path

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from extproc.dev.stack import ENVOY_DIR, HOST, Ports, Stack, http_get

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def scrape(stack) -> dict[tuple[str, tuple], float]:
    status, body = http_get(stack.service_admin_url() + "/metrics")
    assert status == 200
    out = {}
    for fam in text_string_to_metric_families(body.decode()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def total(samples, name) -> float:
    return sum(v for (n, _), v in samples.items() if n == name)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = Stack(Ports.free(2, 2), envoy_config=ENVOY_DIR / "duplex.yaml", worker_args=["--token-delay", "0.01"],
              service_args=["--log-level", "debug"], workdir=Path(tmp_path_factory.mktemp("ops")))
    s.start()
    try:
        yield s
    finally:
        s.stop()


def test_metrics_after_real_traffic_and_inflight_back_to_zero(stack):
    before = scrape(stack)
    c = openai.OpenAI(base_url=stack.base_url, api_key="unused", max_retries=0)
    seen_inflight = []

    def one(i):
        stream = c.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": f"metrics {i} " * 50}], stream=True)
        for _ in stream:
            pass

    with concurrent.futures.ThreadPoolExecutor(8) as ex:
        futures = [ex.submit(one, i) for i in range(40)]
        time.sleep(0.15)
        seen_inflight.append(total(scrape(stack), "prefix_router_inflight_requests"))
        for f in futures:
            f.result()
    # in flight during the load, and exactly 0 once Envoy's access log reported every request
    assert max(seen_inflight) > 0
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and total(scrape(stack), "prefix_router_inflight_requests") != 0:
        time.sleep(0.1)
    after = scrape(stack)
    assert total(after, "prefix_router_inflight_requests") == 0
    assert total(after, "prefix_router_decisions_total") - total(before, "prefix_router_decisions_total") == 40
    assert after[("prefix_router_decision_seconds_count", ())] - before.get(("prefix_router_decision_seconds_count", ()), 0) == 40
    assert after[("prefix_router_match_rate_count", ())] > 0
    # 40 distinct prompts sharing a few characters: 40 new sessions, none continuing a conversation
    new_sessions = ("prefix_router_new_session_match_rate_count", ())
    assert after[new_sessions] - before.get(new_sessions, 0) == 40
    tree = {dict(l)["upstream"] for (n, l), v in after.items() if n == "prefix_router_tree_characters" and v > 0}
    assert tree and tree <= set(stack.router_addresses)
    assert {dict(l)["upstream"] for (n, l), v in after.items() if n == "prefix_router_upstream_healthy" and v == 1} == set(stack.router_addresses)


def test_bad_input_is_counted_by_reason(stack):
    import urllib.request
    before = scrape(stack)
    req = urllib.request.Request(f"{stack.base_url}/chat/completions", data=b"{not json", headers={"content-type": "application/json"})
    try:
        urllib.request.urlopen(req, timeout=30)
    except urllib.error.HTTPError:
        pass  # the worker answers 400; what matters is the routing
    after = scrape(stack)
    key = ("prefix_router_bad_input_total", (("reason", "invalid_json"),))
    assert after[key] - before.get(key, 0) == 1


def test_logs_are_json_with_one_decision_line_per_request_under_envoys_own_id(stack):
    c = openai.OpenAI(base_url=stack.base_url, api_key="unused", max_retries=0)
    raw = c.chat.completions.with_raw_response.create(model="fake-model", messages=[{"role": "user", "content": "log me"}],
                                                      extra_headers={"x-request-id": "log-test-1"}, extra_query={"probe": "log-test"})
    assert raw.parse().choices
    deadline = time.monotonic() + 5
    while not (ours := [e for e in stack.envoy_access_log() if "probe=log-test" in e["path"]]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(ours) == 1
    envoy_id = ours[0]["request_id"]
    assert envoy_id and envoy_id != "log-test-1"  # the client's id was dropped; Envoy made its own
    time.sleep(0.3)
    lines = [json.loads(l) for l in stack.log("service-0").splitlines() if l.strip()]
    assert all("event" in l and "timestamp" in l and "level" in l for l in lines)
    mine = [l for l in lines if l.get("request_id") == envoy_id and l["event"] == "decision"]
    assert len(mine) == 1
    d = mine[0]
    assert d["upstream"] in stack.router_addresses and d["reason"] and "decision_us" in d and d["text_len"] == len("log me")
    log = stack.log("service-0")
    assert "log me" not in log and "log-test-1" not in log  # no prompt text without --log-prompts; no client id


def test_health_and_readiness(stack):
    assert http_get(stack.service_admin_url() + "/healthz")[0] == 200
    status, body = http_get(stack.service_admin_url() + "/readyz")
    assert status == 200 and json.loads(body)["healthy"] == 2


def test_reload_under_traffic_keeps_tree_and_requests(tmp_path_factory):
    """Remove a router from the config file under traffic, then bring it back with SIGHUP."""
    work = Path(tmp_path_factory.mktemp("reload"))
    cfg = work / "prefix-router.yaml"
    s = Stack(Ports.free(2, 1), envoy_config=ENVOY_DIR / "duplex.yaml", upstream_flags=False,
              service_args=["--config", str(cfg)], workdir=work)
    cfg.write_text(f"upstreams: [{', '.join(s.router_addresses)}]\ncache_threshold: 0.3\n")
    with s:
        c = openai.OpenAI(base_url=s.base_url, api_key="unused", max_retries=0)
        stop = threading.Event()
        results = []

        def load(i):
            n = 0
            while not stop.is_set():
                raw = c.chat.completions.with_raw_response.create(model="fake-model", messages=[{"role": "user", "content": f"client {i} turn {n}"}])
                results.append((time.monotonic(), raw.http_response.status_code, raw.headers["x-prefix-router-upstream"]))
                n += 1

        # a conversation that lives on whichever router it lands on, to check the tree survives
        sticky = [{"role": "system", "content": "reload keeps me " * 100}, {"role": "user", "content": "turn 0"}]
        home = c.chat.completions.with_raw_response.create(model="fake-model", messages=sticky).headers["x-prefix-router-upstream"]
        other = next(a for a in s.router_addresses if a != home)
        with concurrent.futures.ThreadPoolExecutor(3) as ex:
            futures = [ex.submit(load, i) for i in range(3)]
            time.sleep(1.0)
            cfg.write_text(f"upstreams: [{home}]\ncache_threshold: 0.5\n")
            time.sleep(2.5)  # the file is polled every second
            changed_at = time.monotonic()
            time.sleep(1.0)
            cfg.write_text(f"upstreams: [{', '.join(s.router_addresses)}]\ncache_threshold: 0.5\n")
            os.kill(s.procs["service-0"].pid, signal.SIGHUP)
            time.sleep(1.0)
            stop.set()
            for f in futures:
                f.result()
        assert results and all(code == 200 for _, code, _ in results)
        assert all(up == home for t, _, up in results if changed_at <= t <= changed_at + 1.0)
        sticky.append({"role": "user", "content": "turn 1"})
        assert c.chat.completions.with_raw_response.create(model="fake-model", messages=sticky).headers["x-prefix-router-upstream"] == home
        samples = scrape(s)
        assert samples[("prefix_router_config_reloads_total", (("result", "ok"),))] >= 2
        assert other in {dict(l)["upstream"] for (n, l), v in samples.items() if n == "prefix_router_upstream_healthy"}


def test_admin_cli_commands(stack, tmp_path):
    import subprocess
    import sys

    def cli(*args, token=True):
        env = dict(os.environ, PREFIX_ROUTER_ADMIN_TOKEN_FILE=str(stack.admin_token_file)) if token else {
            k: v for k, v in os.environ.items() if k != "PREFIX_ROUTER_ADMIN_TOKEN_FILE"}
        return subprocess.run([sys.executable, "-m", "extproc", *args], capture_output=True, text=True, timeout=30, env=env)

    addr = f"{HOST}:{stack.ports.service_admin_grpc[0]}"
    # its own traffic first: this test must not depend on what earlier tests sent
    prompt = "the cli test's own prompt " * 20
    c = openai.OpenAI(base_url=stack.base_url, api_key="unused", max_retries=0)
    c.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": prompt}])

    r = cli("upstreams", "--admin-grpc", addr, "--json")
    assert r.returncode == 0, r.stderr
    ups = json.loads(r.stdout)["upstreams"]
    assert [u["address"] for u in ups] == stack.router_addresses
    assert all(isinstance(u["inflight"], int) and u["health_check"] == "up" for u in ups)
    assert [u["workers"] for u in ups] == [len(w) for w in stack.ports.workers]  # as each sglang-router reports them
    table = cli("upstreams", "--admin-grpc", addr).stdout.splitlines()
    assert table[0].split()[:2] == ["UPSTREAM", "HEALTHY"] and {l.split()[0] for l in table[1:3]} == set(stack.router_addresses)

    body = tmp_path / "req.json"
    body.write_text(json.dumps({"model": "fake-model", "messages": [{"role": "user", "content": prompt + "and a follow-up"}]}))
    r = cli("explain", str(body), "--admin-grpc", addr, "--json")
    assert r.returncode == 0, r.stderr
    e = json.loads(r.stdout)
    assert e["reason"] == "cache_hit" and e["upstream"] in stack.router_addresses and e["match_rate"] > 0.9
    assert "no_text_reason" not in e  # an empty field is left out
    assert isinstance(e["continuation"], bool)
    # the session it would continue, as --move-evicted-sessions (on by default) counts it: the prompt sent above
    assert (e["session"]["new"], e["session"]["turn"], e["session"]["moves"]) == (False, 2, False)
    chosen = next(u for u in e["upstreams"] if u["address"] == e["upstream"])
    assert chosen["cost"] == min(u["cost"] for u in e["upstreams"]) and chosen["recompute_characters"] == 0
    from extproc.config import DEFAULTS

    assert all(u["continuation_knee"] == DEFAULTS.continuation_knee * u["workers"] == DEFAULTS.continuation_knee * 2 for u in e["upstreams"])
    text = cli("explain", str(body), "--admin-grpc", addr).stdout
    assert "reason" in text and "RECOMPUTE" in text and "COST" in text and "KNEE" in text and "session_turn" in text

    r = cli("tree", "--admin-grpc", addr, "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["stored_characters"] > 0
    assert json.loads(r.stdout)["observed_hit_ratio_per_upstream"] == {}  # --observe-sample is off here

    r = cli("config", "--admin-grpc", addr, "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["upstreams"] == stack.router_addresses  # the running service's, not this invocation's

    r = cli("upstreams", "--admin-grpc", "127.0.0.1:1")
    assert r.returncode == 1 and "UNAVAILABLE" in r.stderr
    r = cli("upstreams", "--set", "127.0.0.1:9", "--admin-grpc", addr, token=False)
    assert r.returncode == 1 and "UNAUTHENTICATED" in r.stderr
