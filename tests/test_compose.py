"""docker-compose.yml describes the same topology as the local process stack (no engine runs here)."""

from pathlib import Path

import yaml

from extproc.dev.stack import ENVOY_DIR, ROOT, Ports, Stack, render_envoy_config

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
    for r in range(len(s.ports.services)):
        argv = s.service_argv(r)
        i = argv.index("--admin-token-file")
        want[f"prefix-router-{r}"] = argv[:i] + argv[i + 2 :]  # compose leaves the admin API off (see its comments)
    want["nats"] = s.nats_argv()
    want["envoy"] = s.envoy_argv("/etc/envoy/envoy.yaml")
    assert set(COMPOSE) == set(want)
    for name, argv in want.items():
        assert COMPOSE[name]["command"] == argv, name
        assert COMPOSE[name]["network_mode"] == "host", name
    assert "--sync-url" in want["prefix-router-0"] and len(s.ports.services) == 2  # make run's two replicas, synced


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


def test_image_is_built_from_the_project_without_envoy():
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "COPY extproc" in dockerfile and 'ENTRYPOINT ["python"]' in dockerfile
    assert "'.[sglang]'" in dockerfile and "envoy" not in dockerfile.split("RUN", 1)[1].split("\n")[0]
    assert all(COMPOSE[n].get("build") == "." for n in COMPOSE if n not in ("envoy", "nats"))
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    assert ignore[ignore.index("*") + 1 :][:3] == ["!pyproject.toml", "!README.md", "!extproc/"]  # no .venv in the context


def _port_of(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1].rsplit(":", 1)[-1]


def test_every_part_is_health_checked_and_started_after_what_it_needs():
    s = stack()
    checks = {
        **{f"fake-worker-{r}-{w}": f"http://127.0.0.1:{p}/health" for r, ps in enumerate(s.ports.workers) for w, p in enumerate(ps)},
        **{f"sglang-router-{r}": f"http://127.0.0.1:{p}/health" for r, p in enumerate(s.ports.routers)},
        **{f"prefix-router-{i}": f"http://127.0.0.1:{_port_of(s.service_argv(i), '--admin-listen')}/readyz" for i in range(2)},
        "nats": f"http://127.0.0.1:{s.ports.nats_monitor}/healthz",
    }
    for name, url in checks.items():
        assert url in COMPOSE[name]["healthcheck"]["test"][-1], name
    for name, svc in COMPOSE.items():
        for dep, how in svc.get("depends_on", {}).items():
            assert how == {"condition": "service_healthy"} and "healthcheck" in COMPOSE[dep], (name, dep)
    assert set(COMPOSE["envoy"]["depends_on"]) == {"prefix-router-0", "prefix-router-1"}
    assert "nats" in COMPOSE["prefix-router-1"]["depends_on"]


def test_the_litellm_config_points_at_make_runs_envoy():
    cfg = yaml.safe_load((ROOT / "deploy" / "litellm" / "config.yaml").read_text())
    (model,) = cfg["model_list"]  # one deployment: Envoy picks the router, not LiteLLM
    assert model["litellm_params"]["api_base"] == f"http://127.0.0.1:{Ports.fixed().envoy}/v1"
    assert cfg["general_settings"]["master_key"] == "os.environ/LITELLM_MASTER_KEY"  # never a key in the file
