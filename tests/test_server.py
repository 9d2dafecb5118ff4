"""The service in process: reload, discovery, the admin listener and the admin gRPC API."""


import os

import grpc
import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families

from extproc import metrics
from extproc.admin import Admin
from extproc.api.v1 import admin_pb2 as apb
from extproc.api.v1 import admin_pb2_grpc as apb_grpc
from extproc.config import ConfigError, build
from extproc.director import Outcome, RequestInfo, SWEEP_TO
from extproc.tree import NODE_CHARS
from extproc.addresses import AddressError, resolve_all
from extproc.discovery import read_upstreams_file
from extproc.server import Service

LISTEN = {"grpc_listen": "127.0.0.1:0", "admin_listen": "127.0.0.1:0", "admin_grpc_listen": "127.0.0.1:0"}
TOKEN = "test-admin-token-0123456789"
AUTH = (("authorization", f"Bearer {TOKEN}"),)


@pytest.fixture(scope="session")
def token_file(tmp_path_factory):
    f = tmp_path_factory.mktemp("admin") / "token"
    f.write_text(TOKEN + "\n")
    return str(f)


class Authed:
    """An admin stub whose every call carries the token."""

    def __init__(self, stub):
        self.stub = stub

    def __getattr__(self, name):
        call = getattr(self.stub, name)
        return lambda request, **kw: call(request, metadata=AUTH, **kw)


def make(flags=None, env=None) -> Service:
    flags = {**LISTEN, **(flags or {})}
    return Service(build(flags, env=env or {}), reload=lambda: build(flags, env=env or {}))


@pytest.fixture
async def svc(tmp_path, token_file):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("upstreams: [127.0.0.1:1, 127.0.0.1:2]\n")
    s = make({"config": str(cfg), "admin_token_file": token_file})
    await s.start()
    s.config_path = cfg
    yield s
    await s.stop(delay=0)


async def test_reload_changes_pool_and_thresholds_keeps_tree_and_inflight(svc):
    d = svc.director
    d.tree.insert("", "kept text", "127.0.0.1:1", 0)
    d.tree.insert("", "dropped text", "127.0.0.1:2", 0)
    d.pool.tickets.issue("127.0.0.1:1", now=0)
    svc.config_path.write_text("upstreams: [127.0.0.1:1, 127.0.0.1:3]\ncache_threshold: 0.9\n")
    assert await svc.reload()
    assert list(d.pool.upstreams) == ["127.0.0.1:1", "127.0.0.1:3"]
    assert d.policy.cache_threshold == 0.9
    assert d.tree.tenant_chars() == {"127.0.0.1:1": len("kept text") + NODE_CHARS}
    assert d.pool.loads()["127.0.0.1:1"] == 1  # in flight survives


async def test_a_config_file_applies_only_once_it_stopped_changing(svc):
    """A half-written file (here: '90' caught as '9') is never applied: a change applies at the
    first poll that sees the file as it was at the poll before."""
    d = svc.director
    svc.config_path.write_text("upstreams: [127.0.0.1:1, 127.0.0.1:2]\ninflight_timeout_secs: 9")
    await svc.poll_config()  # first sight of the change: wait
    assert d.cfg.inflight_timeout_secs == 900
    svc.config_path.write_text("upstreams: [127.0.0.1:1, 127.0.0.1:2]\ninflight_timeout_secs: 90\n")
    os.utime(svc.config_path, ns=(1, 1))  # a new signature even within the clock's resolution
    await svc.poll_config()  # it changed again: still settling
    assert d.cfg.inflight_timeout_secs == 900
    await svc.poll_config()  # the same as one poll ago: applied
    assert d.cfg.inflight_timeout_secs == 90


async def test_an_admin_override_survives_reloads_that_keep_the_configured_upstreams(svc):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{svc.ports['admin_grpc']}") as ch:
        await Authed(apb_grpc.AdminStub(ch)).SetUpstreams(apb.SetUpstreamsRequest(upstreams=["127.0.0.1:7"]))
    svc.config_path.write_text("upstreams: [127.0.0.1:1, 127.0.0.1:2]\ncache_threshold: 0.5\n")
    assert await svc.reload()
    assert svc.director.addresses() == ["127.0.0.1:7"] and svc.director.policy.cache_threshold == 0.5
    svc.config_path.write_text("upstreams: [127.0.0.1:1, 127.0.0.1:3]\n")
    assert await svc.reload()  # the configured upstreams changed: they replace the override
    assert svc.director.addresses() == ["127.0.0.1:1", "127.0.0.1:3"]


@pytest.mark.parametrize("line", ["health_interval_secs: .inf", "eviction_interval_secs: .nan", "inflight_timeout_secs: 1e9", "max_tree_size: -5"])
async def test_non_finite_and_out_of_range_values_change_nothing(svc, line):
    svc.config_path.write_text(f"upstreams: [127.0.0.1:3]\n{line}\n")
    assert not await svc.reload()
    assert svc.director.addresses() == ["127.0.0.1:1", "127.0.0.1:2"]


async def test_failed_reload_keeps_the_running_config(svc):
    before = metrics.RELOADS.labels("failed")._value.get()
    svc.config_path.write_text("cache_threshold: 7\nupstreams: [127.0.0.1:9]\n")
    assert not await svc.reload()
    svc.config_path.write_text("upstreams: []\n")
    assert not await svc.reload()
    assert metrics.RELOADS.labels("failed")._value.get() == before + 2
    assert list(svc.director.pool.upstreams) == ["127.0.0.1:1", "127.0.0.1:2"]


async def test_upstreams_file_and_names(tmp_path):
    f = tmp_path / "ups.json"
    f.write_text('["localhost:7001", "127.0.0.1:7002"]')
    assert read_upstreams_file(str(f)) == ["localhost:7001", "127.0.0.1:7002"]
    assert set(resolve_all("localhost:7001")) <= {"127.0.0.1:7001", "[::1]:7001"}
    s = make({"upstreams_file": str(f)})
    await s.start()
    try:
        assert "127.0.0.1:7002" in s.director.pool
        f.write_text("- 127.0.0.1:7003\n")
        await s.discovery.refresh()
        assert list(s.director.pool.upstreams) == ["127.0.0.1:7003"]
        f.write_text("{broken")  # an unreadable file keeps the pool
        await s.discovery.refresh()
        assert list(s.director.pool.upstreams) == ["127.0.0.1:7003"]
    finally:
        await s.stop(delay=0)
    with pytest.raises(AddressError):
        resolve_all("no-such-host.invalid:1")


async def test_admin_grpc_api(svc):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{svc.ports['admin_grpc']}") as ch:
        stub = Authed(apb_grpc.AdminStub(ch))
        ups = await stub.ListUpstreams(apb.ListUpstreamsRequest())
        assert [u.address for u in ups.upstreams] == ["127.0.0.1:1", "127.0.0.1:2"] and all(u.healthy for u in ups.upstreams)
        body = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "explain this prompt please"}]})
        info = RequestInfo(path="/v1/chat/completions")
        svc.director.route(info, body)
        assert svc.director.finished(info.ticket, Outcome.OK)
        e = await stub.Explain(apb.ExplainRequest(path="/v1/chat/completions", body=body))
        assert e.reason == "cache_hit" and e.match_rate == 1.0 and e.routing_text_head == "explain this prompt please"
        assert e.continuation  # the same prompt again: a whole stored text
        assert {u.address: u.matched_characters for u in e.upstreams}[e.upstream] == len("explain this prompt please")
        assert {u.address: u.recompute_characters for u in e.upstreams} == {
            u.address: (0 if u.address == e.upstream else len("explain this prompt please")) for u in e.upstreams}
        chars_before = svc.director.tree.total_chars()
        fresh = await stub.Explain(apb.ExplainRequest(path="/v1/chat/completions", body=b'{"messages":[{"role":"user","content":"new"}]}'))
        assert not fresh.continuation
        assert fresh.HasField("session") and fresh.session.new and fresh.session.turn == 1  # a session it would begin
        assert svc.director.tree.total_chars() == chars_before  # a dry run
        bad = await stub.Explain(apb.ExplainRequest(path="/v1/chat/completions", body=b"{nope"))
        assert bad.no_text_reason == "invalid_json" and bad.reason == "no_routing_text"
        t = await stub.TreeStats(apb.TreeStatsRequest())
        assert t.stored_characters == chars_before and t.max_tree_size == 67108864
        c = orjson.loads((await stub.GetConfig(apb.GetConfigRequest())).config_json)
        assert c["upstreams"] == ["127.0.0.1:1", "127.0.0.1:2"] and c["cache_threshold"] == 0.3
        ups = await stub.SetUpstreams(apb.SetUpstreamsRequest(upstreams=["127.0.0.1:2", "127.0.0.1:5"]))
        assert [u.address for u in ups.upstreams] == ["127.0.0.1:2", "127.0.0.1:5"]
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.SetUpstreams(apb.SetUpstreamsRequest(upstreams=["nope"]))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_admin_endpoints(svc):
    d = svc.director
    d.route(RequestInfo(path="/v1/completions"), orjson.dumps({"prompt": "hello"}))
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
            u.active_ok = False
        r = await client.get("/readyz")
        assert r.status == 503 and (await r.json())["healthy"] == 0
    finally:
        await client.close()


async def test_listen_errors_name_the_flag(token_file):
    s = make({"upstreams": ["127.0.0.1:1"], "admin_grpc_listen": "256.1.1.1:1", "admin_token_file": token_file})
    with pytest.raises(OSError, match="--admin-grpc-listen"):
        await s.start()
    await s.stop(delay=0)


async def test_dns_names_are_re_resolved_and_keep_their_last_addresses(monkeypatch):
    """A name giving every router pod: new pods join, gone pods leave, a failed lookup keeps the pool."""
    import socket

    import extproc.addresses as addresses

    # loopback addresses only: the health checker really connects to them
    answers = [["127.0.1.1", "127.0.1.2"], ["127.0.1.2", "127.0.1.3"], OSError("temporary failure")]

    def fake_getaddrinfo(host, port, *a, **kw):
        assert host == "routers.llm.svc"
        answer = answers[0] if len(answers) == 1 else answers.pop(0)
        if isinstance(answer, Exception):
            raise socket.gaierror(answer.args[0])
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port)) for ip in answer]

    monkeypatch.setattr(addresses.socket, "getaddrinfo", fake_getaddrinfo)
    s = make({"upstreams": ["routers.llm.svc:30000"]})
    await s.start()
    try:
        assert list(s.director.pool.upstreams) == ["127.0.1.1:30000", "127.0.1.2:30000"]
        s.director.tree.insert("", "held by the pod that goes away", "127.0.1.1:30000", 0)
        await s.discovery.refresh()
        assert list(s.director.pool.upstreams) == ["127.0.1.2:30000", "127.0.1.3:30000"]
        assert "127.0.1.1:30000" not in s.director.tree.tenant_chars()
        await s.discovery.refresh()  # the lookup fails: the pool stays
        assert list(s.director.pool.upstreams) == ["127.0.1.2:30000", "127.0.1.3:30000"]
    finally:
        await s.stop(delay=0)


def test_eviction_slices_trim_each_upstream_and_forget_removed_ones():
    from extproc.director import Director

    d = Director(build({"upstreams": ["127.0.0.1:1"], "max_tree_size": "5000"}, env={}))
    d.set_upstreams(["127.0.0.1:1"])
    for i in range(600):
        d.tree.insert("", f"conversation {i} " + "x" * 200, "127.0.0.1:1", float(i))
    d.tree.insert("", "an upstream that left the pool", "127.0.0.1:9", 0.0)
    slices = sum(1 for _ in d.evict_slices(slice_secs=0.0))  # yield as often as it can
    assert slices > 1
    assert d.tree.tenant_chars() == {"127.0.0.1:1": d.tree.tenant_chars()["127.0.0.1:1"]}
    assert d.tree.tenant_chars()["127.0.0.1:1"] <= 5000 * SWEEP_TO  # trimmed below the budget, with room
    assert d.tree.match("", "conversation 599 " + "x" * 200).matched > 200  # the newest stay
    assert d.tree.match("", "conversation 0 " + "x" * 200).matched < 20  # the oldest went


async def test_the_admin_api_needs_the_token_and_is_off_without_one(svc, token_file):
    denied = metrics.ADMIN_DENIED._value.get()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{svc.ports['admin_grpc']}") as ch:
        stub = apb_grpc.AdminStub(ch)
        for metadata in ((), (("authorization", "Bearer wrong-token-0123456789"),), (("authorization", TOKEN),)):
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await stub.SetUpstreams(apb.SetUpstreamsRequest(upstreams=["127.0.0.1:9"]), metadata=metadata)
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert svc.director.addresses() == ["127.0.0.1:1", "127.0.0.1:2"]
        assert metrics.ADMIN_DENIED._value.get() == denied + 3
    off = make({"upstreams": ["127.0.0.1:1"]})
    await off.start()
    try:
        assert "admin_grpc" not in off.ports  # no token, no admin API
    finally:
        await off.stop(delay=0)


@pytest.mark.parametrize("address", ["169.254.169.254:80", "[fe80::1]:80", "100.100.100.200:80", "8.8.8.8:443", "0.0.0.0:80", "[::ffff:169.254.169.254]:80"])
async def test_no_source_may_name_an_address_outside_the_policy(svc, address):
    refused = metrics.UPSTREAMS_REFUSED._value.get()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{svc.ports['admin_grpc']}") as ch:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await Authed(apb_grpc.AdminStub(ch)).SetUpstreams(apb.SetUpstreamsRequest(upstreams=["127.0.0.1:7", address]))
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert svc.director.addresses() == ["127.0.0.1:1", "127.0.0.1:2"]
    # the same address from the config file (or DNS, or flags) is dropped, counted and logged
    svc.config_path.write_text(f"upstreams: [127.0.0.1:1, '{address}']\n")
    assert await svc.reload()
    assert svc.director.addresses() == ["127.0.0.1:1"]
    assert metrics.UPSTREAMS_REFUSED._value.get() == refused + 1


async def test_reflection_is_off_unless_asked_for(svc):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    async def services(port):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = reflection_pb2_grpc.ServerReflectionStub(ch)

            async def one():
                yield reflection_pb2.ServerReflectionRequest(list_services="")

            return [r async for r in stub.ServerReflectionInfo(one())]

    with pytest.raises(grpc.aio.AioRpcError) as e:
        await services(svc.ports["grpc"])
    assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
    on = make({"upstreams": ["127.0.0.1:1"], "grpc_reflection": "true"})
    await on.start()
    try:
        assert (await services(on.ports["grpc"]))[0].list_services_response.service
    finally:
        await on.stop(delay=0)


async def test_with_a_client_ca_only_a_certified_client_may_talk_to_the_service(tmp_path):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from extproc.dev.certs import make as make_certs

    certs = make_certs(tmp_path / "ours")
    stranger = make_certs(tmp_path / "theirs")  # a valid certificate from another CA
    s = make({"upstreams": ["127.0.0.1:1"], "grpc_tls_cert": str(certs / "service.pem"), "grpc_tls_key": str(certs / "service-key.pem"),
              "grpc_tls_client_ca": str(certs / "ca.pem")})
    await s.start()
    target = f"127.0.0.1:{s.ports['grpc']}"
    read = lambda p: p.read_bytes()  # noqa: E731

    async def check(creds):
        async with grpc.aio.secure_channel(target, creds) as ch:
            return await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)

    try:
        ok = await check(grpc.ssl_channel_credentials(read(certs / "ca.pem"), read(certs / "envoy-key.pem"), read(certs / "envoy.pem")))
        assert ok.status == health_pb2.HealthCheckResponse.SERVING
        for creds in (grpc.ssl_channel_credentials(read(certs / "ca.pem")),  # no client certificate
                      grpc.ssl_channel_credentials(read(certs / "ca.pem"), read(stranger / "envoy-key.pem"), read(stranger / "envoy.pem"))):
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await check(creds)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        async with grpc.aio.insecure_channel(target) as ch:  # plaintext
            with pytest.raises(grpc.aio.AioRpcError):
                await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
    finally:
        await s.stop(delay=0)


def test_tls_settings_go_together():
    with pytest.raises(ConfigError, match="--grpc-tls-cert and --grpc-tls-key"):
        build({"grpc_tls_cert": "a.pem"}, env={})
    with pytest.raises(ConfigError, match="--grpc-tls-client-ca needs"):
        build({"grpc_tls_client_ca": "ca.pem"}, env={})
