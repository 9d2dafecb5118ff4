"""The simulator's model of one sglang-router (``bench.sim.engine.SglangRouter``) against the
real sglang-router 0.3.2 over fake workers: every figure bench.eval reports rests on that model,
so where the real router places misses and hits is checked here, request by request, with the
model fed the same texts and the same loads.

What the real router was seen to do (cache_aware, default thresholds, load never imbalanced):
a miss goes to its least loaded worker, and on a tie to the first in its registry (the order its
workers registered: one worker for the process, not always the first of ``--worker-urls``; the
model's "first" is that worker up to a relabelling); a hit goes to the worker that holds the
prefix even while that worker is busy.
"""

from __future__ import annotations

import json
import random
import threading
import time
import urllib.request
from types import SimpleNamespace

import pytest

from bench.sim.engine import SglangRouter
from extproc.config import DEFAULTS
from extproc.dev.stack import Ports, Stack, http_get
from extproc.payload import routing_input

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

WORKERS = 3


def _body(text: str, max_tokens: int) -> bytes:
    return json.dumps({"model": "fake-model", "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens}).encode()


def _post(port: int, text: str, max_tokens: int = 1) -> None:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", _body(text, max_tokens), {"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        r.read()


def _stats(stack: Stack) -> list[dict]:
    return [json.loads(http_get(u + "/stats")[1]) for u in stack.worker_urls(0)]


class Model:
    """The simulator's router over ``WORKERS`` workers, fed what the real one is sent."""

    def __init__(self) -> None:
        self.router = SglangRouter(list(range(WORKERS)))
        self.sim = SimpleNamespace(workers=[SimpleNamespace(inflight=0) for _ in range(WORKERS)], now=0.0, rng=random.Random(0))

    def route(self, text: str, max_tokens: int = 1) -> int:
        ri = routing_input("/v1/chat/completions", _body(text, max_tokens), **DEFAULTS.parse_options())
        p = SimpleNamespace(partition=ri.partition, sglang_text=ri.text)
        return self.router.choose(p, self.sim)  # which stores the text for the worker, as the real router does


@pytest.fixture(scope="module")
def router(tmp_path_factory):
    # 400 output tokens at 5 ms each: a request that holds its worker for about 2 s
    stack = Stack(Ports.free(1, WORKERS), worker_args=["--output-tokens", "400", "--token-delay", "0.005"],
                  workdir=tmp_path_factory.mktemp("router-model"))
    try:
        stack.start_workers()
        stack.start_router(0)
        yield stack
    finally:
        stack.stop()


def _served(stack: Stack, send) -> int:
    """The one worker that served what ``send`` sent."""
    before = [s["requests"] for s in _stats(stack)]
    send()
    grew = [i for i, (s, b) in enumerate(zip(_stats(stack), before)) if s["requests"] > b]
    assert len(grew) == 1, grew
    return grew[0]


def test_misses_one_at_a_time_all_land_on_one_worker_as_the_model_has_it(router):
    """A miss at zero load: every one to the same worker, in the real router and in the model
    (a model breaking these ties at random would spread them and overstate what a router's
    workers share out)."""
    model = Model()
    texts = [f"conversation {i}: " + chr(ord("a") + i) * (300 + 500 * i) for i in range(6)]
    real = [_served(router, lambda t=t: _post(router.ports.routers[0], t)) for t in texts]
    simulated = [model.route(t) for t in texts]
    assert len(set(real)) == 1, real
    assert len(set(simulated)) == 1, simulated


def test_a_hit_stays_on_a_busy_worker_and_a_miss_avoids_it(router):
    """While a worker serves a long request: its prefix's next request still goes there (a hit
    wins over one request of load), and a new text goes to another worker (the least loaded)."""
    port = router.ports.routers[0]
    model = Model()
    doc = "the document: " + "0123456789" * 300
    home = _served(router, lambda: _post(port, doc + " first question"))
    model_home = model.route(doc + " first question")

    slow = threading.Thread(target=_post, args=(port, doc + " a long answer", 400))
    slow.start()
    try:
        deadline = time.monotonic() + 10
        while _stats(router)[home]["inflight"] < 1:
            assert time.monotonic() < deadline, "the long request never reached its worker"
            time.sleep(0.02)
        assert model.route(doc + " a long answer") == model_home
        model.sim.workers[model_home].inflight = 1

        assert _served(router, lambda: _post(port, doc + " a second question")) == home
        assert model.route(doc + " a second question") == model_home

        assert _served(router, lambda: _post(port, "something else entirely " + "z" * 2000)) != home
        assert model.route("something else entirely " + "z" * 2000) != model_home
    finally:
        slow.join(30)
