"""bench.overhead's gRPC floor measures the pinned path: Envoy health-checks it as it does the
service, and its answers pin each request to the benchmark's upstreams. Were it unhealthy, Envoy
would fail open to its fallback route and the floor's row would time a path without ext_proc."""

import urllib.request

import pytest

from bench.overhead import BODY, _floor_stack, _routed, start_envoy, upstream_config
from extproc.dev.stack import free_port

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def test_the_floor_behind_envoy_serves_on_the_pinned_route(tmp_path):
    ups, admin = [free_port(), free_port()], free_port()
    upstreams = start_envoy(tmp_path, "upstreams", upstream_config(admin, ups), admin)
    try:
        stack = _floor_stack(tmp_path / "floor", ups)
        try:
            for _ in range(3):
                req = urllib.request.Request(f"{stack.base_url}/chat/completions", data=BODY, headers={"content-type": "application/json"})
                with urllib.request.urlopen(req, timeout=10) as r:
                    assert r.status == 200
            entries = stack.wait_access_log(0, 3)
            assert len(entries) == 3
            assert {e["route"] for e in entries} == {"pinned"}
            assert {e["upstream"] for e in entries} <= {f"127.0.0.1:{p}" for p in ups}
            # what each overhead row reads to say how much of it failed open, from Envoy's own stats
            assert _routed(stack) == (3, 0)
        finally:
            stack.stop()
    finally:
        upstreams.terminate()
        upstreams.wait(10)
