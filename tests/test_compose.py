"""docker-compose.yml describes the same topology as the local process stack (no engine runs here)."""

from pathlib import Path

import yaml

from extproc.stack import ENVOY_DIR, ROOT, Ports, Stack, render_envoy_config

COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]


def stack() -> Stack:
    return Stack(Ports.fixed(), workdir=Path("/tmp/unused-prefix-router-stack"))


def test_same_parts_same_commands():
    s = stack()
    want = {}
    for r, ports in enumerate(s.ports.workers):
        for w in range(len(ports)):
            want[f"fake-worker-{r}-{w}"] = s.worker_argv(r, w)
        want[f"sglang-router-{r}"] = s.router_argv(r)
    want["prefix-router"] = s.service_argv(0)
    want["envoy"] = s.envoy_argv("/etc/envoy/envoy.yaml")
    assert set(COMPOSE) == set(want)
    for name, argv in want.items():
        assert COMPOSE[name]["command"] == argv, name
        assert COMPOSE[name]["network_mode"] == "host", name


def test_envoy_uses_the_shipped_config_with_the_stack_ports():
    volume = COMPOSE["envoy"]["volumes"][0]
    source = ROOT / volume.split(":")[0]
    assert source.parent == ENVOY_DIR and volume.split(":")[1] == "/etc/envoy/envoy.yaml"
    shipped = yaml.safe_load(source.read_text())
    # rendering with the fixed ports changes nothing: the shipped file already has them
    assert render_envoy_config(source, Ports.fixed()) == shipped
    assert COMPOSE["envoy"]["image"].startswith("envoyproxy/envoy:v1.40")


def test_every_shipped_config_has_the_stack_ports():
    for cfg in ENVOY_DIR.glob("*.yaml"):
        assert render_envoy_config(cfg, Ports.fixed()) == yaml.safe_load(cfg.read_text()), cfg.name


def test_image_is_built_from_the_project():
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "COPY extproc" in dockerfile and 'ENTRYPOINT ["python"]' in dockerfile
    assert all(COMPOSE[n].get("build") == "." for n in COMPOSE if n != "envoy")
