"""The Envoy series the dashboard and alert rules read exist in a real Envoy's exposition after
traffic through the stack (the service's are checked against its registry by test_dashboard)."""

from __future__ import annotations

from pathlib import Path

import openai
import pytest

from extproc.dev.stack import ENVOY_DIR, Ports, Stack, http_get

from tests.test_dashboard import ENVOY, alert_exprs, metric_names, service_series

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def exposed(url: str) -> set[str]:
    body = http_get(url)[1].decode()
    return {line.split("{", 1)[0].split(" ", 1)[0] for line in body.splitlines() if line and not line.startswith("#")}


def test_every_metric_on_the_dashboard_and_in_the_rules_is_exported(tmp_path: Path):
    from extproc.dev import dashboard

    wanted = set().union(*(metric_names(q) for q in dashboard.queries() + alert_exprs()))
    stack = Stack(Ports.free(2, 1, services=2), envoy_config=ENVOY_DIR / "duplex.yaml", workdir=tmp_path)
    with stack:
        c = openai.OpenAI(base_url=stack.base_url, api_key="unused", max_retries=0)
        c.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": "hello"}])
        envoy = exposed(f"{stack.admin_url}/stats/prometheus")
        service = exposed(stack.service_admin_url(0) + "/metrics") | exposed(stack.service_admin_url(1) + "/metrics")  # either decided
    assert ENVOY <= envoy, ENVOY - envoy
    # a labelled counter appears in the service's exposition once a label value occurs; the
    # registry (service_series) knows them all, and the unlabelled ones are there from the start
    assert not wanted - envoy - service_series()
    assert {"prefix_router_decisions_total", "prefix_router_sync_connected", "prefix_router_inflight_requests"} <= service
