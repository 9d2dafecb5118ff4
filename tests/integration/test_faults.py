"""Faults under load from bounded clients: a router dies, the service restarts, the service is down fail-closed."""

import concurrent.futures
import threading
import time
import uuid

import orjson
import pytest

from extproc.dev.stack import ENVOY_DIR, Ports, Stack

from .test_stack import post

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


class Load:
    """``clients`` threads sending unrelated one-turn requests until stopped (every one a cache miss,
    so load balancing spreads them); records (time, status, router)."""

    def __init__(self, stack: Stack, clients: int = 4) -> None:
        self.stack, self.clients = stack, clients
        self.stop = threading.Event()
        self.results: list[tuple[float, int, str]] = []
        self.ex = concurrent.futures.ThreadPoolExecutor(clients)

    def _run(self, i: int) -> None:
        n = 0
        while not self.stop.is_set():
            body = orjson.dumps({"model": "fake-model", "messages": [{"role": "user", "content": f"{uuid.uuid4()} from client {i}, request {n}"}]})
            status, headers, _ = post(self.stack, "/v1/chat/completions", body)
            self.results.append((time.monotonic(), status, headers.get("x-prefix-router-upstream", "")))
            n += 1

    def __enter__(self) -> "Load":
        self.futures = [self.ex.submit(self._run, i) for i in range(self.clients)]
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for f in self.futures:
            f.result(timeout=60)
        self.ex.shutdown()

    def between(self, start: float, end: float) -> list[tuple[float, int, str]]:
        return [r for r in self.results if start <= r[0] <= end]


@pytest.fixture
def stack(tmp_path):
    s = Stack(Ports.free(2, 2, services=2), envoy_config=ENVOY_DIR / "duplex.yaml",
              worker_args=["--token-delay", "0.002"], service_args=["--health-interval-secs", "1"], workdir=tmp_path)
    s.start()
    try:
        yield s
    finally:
        s.stop()


def test_router_killed_under_load_is_avoided_then_rejoins(stack):
    dead = stack.router_addresses[0]
    with Load(stack) as load:
        time.sleep(1.5)
        killed = time.monotonic()
        stack.kill_router(0)
        time.sleep(4.0)
        restarted = time.monotonic()
        stack.start_router(0)
        time.sleep(4.0)
    before = load.between(0, killed)
    assert {r for _, _, r in before} == set(stack.router_addresses)
    # within one health interval (1 s) of the crash nothing new goes to the dead router ...
    after = load.between(killed + 1.0, restarted)
    assert after and all(status == 200 and router != dead for _, status, router in after), after[:5]
    # ... and only requests sent before the ejection failed
    failed = [r for r in load.results if r[1] != 200]
    assert all(killed <= t <= killed + 1.0 for t, _, _ in failed), failed
    assert len(failed) <= 2 * load.clients
    # restarted, it takes traffic again
    assert dead in {router for _, status, router in load.between(restarted + 2.0, time.monotonic()) if status == 200}


def test_rolling_restart_of_two_service_replicas_loses_nothing(stack):
    def snapshots_loaded(i: int) -> float:
        return stack.service_metric(i, "prefix_router_sync_snapshots_total", role="load", result="ok")

    with Load(stack) as load:
        time.sleep(1.0)
        for i in (0, 1):
            assert stack.stop_service(i) == 0  # SIGTERM: drains and exits 0
            stack.start_service(i)
            time.sleep(2.0)
            assert snapshots_loaded(i) == 1  # warmed up from the other replica, under load
    assert len(load.results) > 50
    assert all(status == 200 for _, status, _ in load.results), [r for r in load.results if r[1] != 200][:5]
    routes = [e["route"] for e in stack.wait_access_log(0, len(load.results))]
    assert set(routes) == {"pinned"}  # never even failed open: the other replica took over


def test_fail_closed_config_answers_promptly_when_the_service_is_down(tmp_path):
    s = Stack(Ports.free(1, 1), envoy_config=ENVOY_DIR / "duplex-fail-closed.yaml", workdir=tmp_path)
    with s:
        body = orjson.dumps({"model": "fake-model", "messages": [{"role": "user", "content": "closed"}]})
        assert post(s, "/v1/chat/completions", body)[0] == 200
        s.kill_service()
        for _ in range(5):
            t = time.monotonic()
            status, _, _ = post(s, "/v1/chat/completions", body)
            assert status >= 500 and time.monotonic() - t < 2.0
