"""The shipped Envoy configs: accepted by Envoy 1.40, and holding the properties the design relies on."""

import subprocess

import pytest
import yaml

from extproc.dev.stack import ENVOY_DIR, Ports, find_envoy, render_envoy_config

CONFIGS = sorted(ENVOY_DIR.glob("*.yaml"))


def hcm(cfg):
    return cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]


def ext_proc(cfg):
    return next(f for f in hcm(cfg)["http_filters"] if f["name"] == "envoy.filters.http.ext_proc")["typed_config"]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_envoy_validates_shipped_and_rendered(path, tmp_path):
    r = subprocess.run([find_envoy(), "--mode", "validate", "-c", str(path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    rendered = tmp_path / path.name
    rendered.write_text(yaml.safe_dump(render_envoy_config(path, Ports.free(3, 1, services=2))))
    r = subprocess.run([find_envoy(), "--mode", "validate", "-c", str(rendered)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]


def test_both_body_modes_are_shipped():
    modes = {p.stem: ext_proc(yaml.safe_load(p.read_text()))["processing_mode"]["request_body_mode"] for p in CONFIGS}
    assert modes["buffered"] == "BUFFERED" and modes["duplex"] == "FULL_DUPLEX_STREAMED"


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
