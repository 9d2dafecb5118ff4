"""The shipped Envoy configs: accepted by Envoy 1.40, and holding the properties the design relies on."""

import subprocess

import pytest
import yaml

from extproc.dev.certs import make as make_certs
from extproc.dev.stack import DEBUG_HEADER, ENVOY_DIR, Ports, find_envoy, render_envoy_config

CONFIGS = sorted(ENVOY_DIR.glob("*.yaml"))


def hcm(cfg):
    return cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]


def ext_proc(cfg):
    return next(f for f in hcm(cfg)["http_filters"] if f["name"] == "envoy.filters.http.ext_proc")["typed_config"]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_envoy_validates_shipped_and_rendered(path, tmp_path):
    tls = make_certs(tmp_path / "tls") if "mtls" in path.stem else None
    if tls is None:  # the mTLS config names certificate files that only a deployment has
        r = subprocess.run([find_envoy(), "--mode", "validate", "-c", str(path)], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr[-2000:]
    rendered = tmp_path / path.name
    rendered.write_text(yaml.safe_dump(render_envoy_config(path, Ports.free(3, 1, services=2), debug_headers=True, tls_dir=tls)))
    r = subprocess.run([find_envoy(), "--mode", "validate", "-c", str(rendered)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]


def test_both_body_modes_are_shipped():
    modes = {p.stem: ext_proc(yaml.safe_load(p.read_text()))["processing_mode"]["request_body_mode"] for p in CONFIGS}
    assert modes["buffered"] == "BUFFERED" and modes["duplex"] == "FULL_DUPLEX_STREAMED"


def test_mtls_differs_from_duplex_only_in_the_service_clusters_tls():
    mtls = yaml.safe_load((ENVOY_DIR / "duplex-mtls.yaml").read_text())
    duplex = yaml.safe_load((ENVOY_DIR / "duplex.yaml").read_text())
    service = next(c for c in mtls["static_resources"]["clusters"] if c["name"] == "prefix_router")
    tls = service.pop("transport_socket")["typed_config"]
    assert tls["common_tls_context"]["tls_certificates"][0]["certificate_chain"]["filename"].endswith("envoy.pem")
    assert tls["common_tls_context"]["validation_context"]["trusted_ca"]["filename"].endswith("ca.pem")
    assert mtls == duplex


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_production_settings(path):
    cfg = yaml.safe_load(path.read_text())
    h = hcm(cfg)
    text = path.read_text()
    # no debug header telling clients internal addresses
    assert DEBUG_HEADER not in yaml.safe_dump(h["route_config"])
    # only the headers the service reads are sent to it
    allowed = {p["exact"] for p in ext_proc(cfg)["forward_rules"]["allowed_headers"]["patterns"]}
    assert allowed == {":path", "content-encoding", "x-request-id"}
    # the correlation id is Envoy's own
    removed = {m["remove"] for e in h["early_header_mutation_extensions"] for m in e["typed_config"]["mutations"]}
    assert "x-request-id" in removed
    # streams that go idle end; a hung router's requests end with a timeout that counts against it
    assert h["stream_idle_timeout"] == "300s"
    pinned = h["route_config"]["virtual_hosts"][0]["routes"][0]["route"]
    assert pinned["retry_policy"] == {"num_retries": 0, "per_try_idle_timeout": "120s"}
    clusters = {c["name"]: c for c in cfg["static_resources"]["clusters"]}
    for name in ("sglang_routers_pinned", "sglang_routers_fallback", "prefix_router"):
        limits = clusters[name]["circuit_breakers"]["thresholds"][0]
        assert min(limits["max_requests"], limits["max_pending_requests"], limits["max_connections"]) >= 16384, name
    assert "Authorization" not in text or "never Authorization" in text


def test_fail_closed_differs_from_duplex_only_in_failure_mode():
    closed = yaml.safe_load((ENVOY_DIR / "duplex-fail-closed.yaml").read_text())
    duplex = yaml.safe_load((ENVOY_DIR / "duplex.yaml").read_text())
    assert ext_proc(closed).pop("failure_mode_allow") is False
    assert ext_proc(duplex).pop("failure_mode_allow") is True
    assert closed == duplex


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_no_open_proxy(path):
    cfg = yaml.safe_load(path.read_text())
    h = hcm(cfg)
    removed = {m["remove"] for e in h["early_header_mutation_extensions"] for m in e["typed_config"]["mutations"]}
    assert "x-upstream-host" in removed
    ep = ext_proc(cfg)
    assert ep["failure_mode_allow"] is (path.stem != "duplex-fail-closed")
    assert float(ep["message_timeout"].rstrip("s")) >= 60
    routes = h["route_config"]["virtual_hosts"][0]["routes"]
    assert routes[0]["match"]["headers"][0] == {"name": "x-upstream-host", "present_match": True}
    assert routes[0]["route"]["cluster"] == "sglang_routers_pinned"
    assert routes[-1]["route"]["cluster"] == "sglang_routers_fallback" and "headers" not in routes[-1]["match"]
    clusters = {c["name"]: c for c in cfg["static_resources"]["clusters"]}
    assert clusters["sglang_routers_pinned"]["original_dst_lb_config"]["http_header_name"] == "x-upstream-host"
    assert "grpc_health_check" in clusters["prefix_router"]["health_checks"][0]


@pytest.mark.parametrize("path", [p for p in CONFIGS if p.stem.startswith("duplex")], ids=lambda p: p.name)
def test_the_observing_filter_reads_only_sampled_pinned_responses_and_never_waits(path):
    """--observe-sample in duplex mode: the second ext_proc filter runs only on pinned_observed, which
    only the service's own header selects, in observability mode (no answer awaited, nothing changed)."""
    cfg = yaml.safe_load(path.read_text())
    h = hcm(cfg)
    removed = {m["remove"] for e in h["early_header_mutation_extensions"] for m in e["typed_config"]["mutations"]}
    assert "x-prefix-router-observe" in removed  # a client cannot select the observing route
    names = [f["name"] for f in h["http_filters"]]
    assert names == ["envoy.filters.http.ext_proc", "prefix_router.observe", "envoy.filters.http.router"]
    observe = h["http_filters"][1]["typed_config"]
    assert observe["observability_mode"] is True and observe["failure_mode_allow"] is True
    assert observe["grpc_service"] == ext_proc(cfg)["grpc_service"]
    assert {p["exact"] for p in observe["forward_rules"]["allowed_headers"]["patterns"]} == {
        ":status", "x-request-id", "x-upstream-host", "x-prefix-router-observe"}
    mode = observe["processing_mode"]
    assert (mode["request_body_mode"], mode["response_body_mode"], mode["response_header_mode"]) == ("NONE", "STREAMED", "SEND")
    vhost = h["route_config"]["virtual_hosts"][0]
    assert vhost["typed_per_filter_config"]["prefix_router.observe"]["disabled"] is True
    routes = {r["name"]: r for r in vhost["routes"]}
    enabled = [n for n, r in routes.items() if "prefix_router.observe" in r.get("typed_per_filter_config", {})]
    assert enabled == ["pinned_observed"] and list(routes)[0] == "pinned_observed"
    observed, pinned = routes["pinned_observed"], routes["pinned"]
    assert observed["match"]["headers"] == [*pinned["match"]["headers"], {"name": "x-prefix-router-observe", "present_match": True}]
    assert observed["route"] == pinned["route"]
