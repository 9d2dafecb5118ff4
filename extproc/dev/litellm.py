"""LiteLLM's proxy as a local process, for the tests and the benchmark (never for the service).

``make litellm`` installs it into ``.venv-litellm`` (its own virtual environment: ~750 MB of
dependencies that must not pin the project's); ``PREFIX_ROUTER_LITELLM`` names another binary.
It starts on a free loopback port with a test master key and the cost map shipped with it (no
download at start), from a config dictionary shaped like ``deploy/litellm/config.yaml``.
"""

from __future__ import annotations

import os
import secrets
import subprocess
from pathlib import Path

import yaml

from .stack import HOST, ROOT, free_port, http_get, wait_until

CONFIG = ROOT / "deploy" / "litellm" / "config.yaml"


def find_litellm() -> str:
    path = os.environ.get("PREFIX_ROUTER_LITELLM") or str(ROOT / ".venv-litellm" / "bin" / "litellm")
    if not os.access(path, os.X_OK):
        raise RuntimeError(f"LiteLLM's proxy not found at {path}: run `make litellm` (or set PREFIX_ROUTER_LITELLM)")
    return path


def shipped_config(envoy_port: int) -> dict:
    """``deploy/litellm/config.yaml`` pointed at an Envoy listening on ``envoy_port``."""
    cfg = yaml.safe_load(CONFIG.read_text())
    for m in cfg["model_list"]:
        m["litellm_params"]["api_base"] = f"http://{HOST}:{envoy_port}/v1"
    return cfg


class LiteLLM:
    """One LiteLLM proxy: ``start()``/``stop()``, or a context manager."""

    def __init__(self, config: dict, workdir: Path) -> None:
        self.config, self.workdir = config, workdir
        self.port = free_port()
        self.master_key = "sk-test-" + secrets.token_urlsafe(16)
        self.proc: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.port}/v1"

    def start(self) -> "LiteLLM":
        self.workdir.mkdir(parents=True, exist_ok=True)
        path = self.workdir / "litellm-config.yaml"
        path.write_text(yaml.safe_dump(self.config, sort_keys=False))
        env = dict(os.environ, LITELLM_MASTER_KEY=self.master_key, LITELLM_LOCAL_MODEL_COST_MAP="True",
                   LITELLM_TELEMETRY="False", NO_DOCS="True")
        log = open(self.workdir / "litellm.log", "ab")
        self.proc = subprocess.Popen([find_litellm(), "--config", str(path), "--host", HOST, "--port", str(self.port), "--num_workers", "1"],
                                     stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=self.workdir)
        log.close()
        wait_until(lambda: http_get(f"http://{HOST}:{self.port}/health/liveliness")[0] == 200, 120, "litellm", self.proc)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def __enter__(self) -> "LiteLLM":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
