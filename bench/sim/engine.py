"""A discrete-event simulator of the two-layer topology: an upper policy over N SGLang routers,
each balancing W workers with SGLang's cache_aware semantics, each worker with a bounded prefix
cache and a service model.

Worker, with the costs measured on an H200 for an 8B-shaped model (FIELD-NOTES, "What recompute
and queueing cost on a real GPU"): at most ``batch`` requests run at once, the rest wait in FIFO
order. Prefill is compute-bound, so one prefill runs at a time per worker: a request's prefill
waits for the worker's previous prefills, then takes ``prefill_base + uncached tokens x
prefill_per_token`` (~30 µs a token). Decode is memory-bound: a step takes ``decode_step`` while the
worker runs up to ``knee`` requests and ``step_over_knee`` more for each request beyond (fixed at
the request's start from the requests running then); its decode is ``output tokens x step``. Time to
first token = queueing + prefill wait + prefill. The cache is the fake worker's own (16-token blocks
over the ChatML rendering, least recently used first), looked up and filled when the request
starts. Load is in-flight requests, at both layers, from the decision to the end of the response:
what prefix-router and sglang-router count.
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import random
import statistics
from collections import Counter, deque
from dataclasses import dataclass, field

import orjson

from extproc.dev.fakeworker import BLOCK_TOKENS, PrefixCache, token_count
from extproc.payload import render_chat_template, routing_input
from extproc.config import DEFAULTS, policy_config
from extproc.policy import decide
from extproc.tree import RadixTree

from ..common import percentiles
from .workloads import Req


@dataclass(frozen=True)
class Topology:
    routers: int = 4
    workers: int = 2  # per router
    batch: int = 32  # requests a worker runs at once (the rest queue)
    capacity_tokens: int = 1 << 20  # per worker
    # each router's --cache-threshold: above this match rate it sends a request to the prefix's
    # creator (sglang-router 0.3.2's default 0.3; FIELD-NOTES "hot shared prefix")
    router_threshold: float = 0.3


def threshold_suffix(topo: Topology) -> str:
    """What a results file's name adds for routers at another --cache-threshold than
    sglang-router's (``-threshold0.7``); nothing for the default."""
    return "" if topo.router_threshold == Topology.router_threshold else f"-threshold{topo.router_threshold:g}"


def batch_suffix(topo: Topology) -> str:
    """What a results file's name adds for workers running another number of requests at once than
    the simulator's default (``-batch4``); nothing for the default."""
    return "" if topo.batch == Topology.batch else f"-batch{topo.batch}"


def parse_topology(value: str) -> Topology:
    """``RxW`` (a command-line value): R routers of W workers each, both at least 1."""
    try:
        routers, workers = (int(n) for n in value.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected ROUTERSxWORKERS like 3x3, got {value!r}") from None
    if routers < 1 or workers < 1:
        raise argparse.ArgumentTypeError(f"routers and workers must be at least 1, got {value!r}")
    return Topology(routers, workers)


@dataclass(frozen=True)
class ServiceModel:
    """An 8B-shaped model on an H200 (FIELD-NOTES): prefill 19 ms for 512 tokens and ~30 µs per
    further uncached token; a decode step of 17.6 ms up to 8 running requests, ~0.87 ms more per
    request beyond ((66.3 - 17.6) ms over 56 more requests)."""

    prefill_base: float = 0.015
    prefill_per_token: float = 30e-6
    decode_step: float = 0.0176
    knee: int = 8
    step_over_knee: float = 0.00087
    serial_prefill: bool = True  # False: prefills overlap (the fake worker's asyncio sleeps)


@dataclass
class Prepared:
    """What the simulation needs of a request, computed once per workload."""

    req: Req
    body: bytes
    keys: list[bytes]  # the worker-side cache blocks of its rendering
    prompt_tokens: int
    sglang_text: str
    partition: str
    texts: dict[str, str] = field(default_factory=dict)


def prepare(workload: list[Req]) -> list[Prepared]:
    out = []
    for r in workload:
        body = orjson.dumps(r.request_body())
        rendering = render_chat_template(r.messages, r.tools)
        ri = routing_input("/v1/chat/completions", body, **DEFAULTS.parse_options())
        out.append(Prepared(r, body, PrefixCache.block_keys(rendering), token_count(rendering), ri.text, ri.partition))
    return out


class Worker:
    def __init__(self, topo: Topology) -> None:
        self.cache = PrefixCache(topo.capacity_tokens)
        self.free = topo.batch
        self.queue: deque = deque()
        self.inflight = 0
        self.prefill_until = 0.0  # the worker's prefills run one at a time


class SglangRouter:
    """sglang-router 0.3.2's cache_aware over its own workers: creator on a hit, else the least
    loaded, first on ties. The real router's first is the first in its registry (the order its
    workers registered, not always ``--worker-urls``' order), the same up to a relabelling;
    tests/integration/test_router_model.py checks the two side by side."""

    def __init__(self, workers: list[int], threshold: float = Topology.router_threshold) -> None:
        self.workers = workers
        self.cfg = policy_config(hit_choice="creator", tie_break="first", cache_threshold=threshold)
        self.tree = RadixTree()
        self.inflight = 0

    def choose(self, p: Prepared, sim: "Sim") -> int:
        loads = {str(w): sim.workers[w].inflight for w in self.workers}
        d = decide(self.tree, loads, p.partition, p.sglang_text, sim.now, self.cfg, sim.rng)
        return int(d.upstream)


class Sim:
    def __init__(self, prepared: list[Prepared], upper, topo: Topology, model: ServiceModel, seed: int = 0, rate_scale: float = 1.0,
                 clients: int | None = None, overhead: tuple[float, float] = (0.0, 0.0)) -> None:
        """``clients``: closed loop instead of the workload's arrival times: that many clients, each
        sending one session's turns back to back, then taking the next session (bench.e2e's replay).
        ``overhead``: in the closed loop, each request after a client's first is sent that long
        (seconds, drawn uniformly from the range) after the last answer: what a real stack adds to
        the workers' own time (HTTP, proxies, the client). Without it every client moves in
        lockstep, so a per-request rule like round robin sends each client's turns to the same
        router every time: a sticky rule that no real stack plays (bench.e2e_rivals)."""
        self.topo, self.model, self.upper = topo, model, upper
        self.rng = random.Random(seed)
        self.overhead = overhead
        self.workers = [Worker(topo) for _ in range(topo.routers * topo.workers)]
        self.routers = [SglangRouter(list(range(r * topo.workers, (r + 1) * topo.workers)), topo.router_threshold) for r in range(topo.routers)]
        self.now = 0.0
        self.events: list = []
        self.seq = itertools.count()
        self.sessions: dict[str, deque[Prepared]] = {}
        for p in prepared:
            self.sessions.setdefault(p.req.session, deque()).append(p)
        self.clients = clients
        self.waiting: deque[deque[Prepared]] = deque()
        if clients:
            self.waiting.extend(self.sessions.values())
            for _ in range(min(clients, len(self.waiting))):
                self._push(0.0, "arrive", self.waiting.popleft()[0])
        else:
            for q in self.sessions.values():
                self._push(q[0].req.start / rate_scale, "arrive", q[0])
        # (ttft, finish, prompt, cached, output, latency: arrival to last token, what bench.e2e times)
        self.records: list[tuple[float, float, int, int, int, float]] = []
        self.imbalance: list[float] = []
        self.reasons: Counter = Counter()
        self.rate_scale = rate_scale
        self.order: list[Prepared] = []  # arrival order (the end-to-end replay sends in this order)
        # The reuse bound: every block any request started before this one put in any cache, kept
        # forever. A worker can only hold what an earlier request put there, so no policy, topology
        # or capacity can hit more than the leading run found here: a true upper bound.
        self.seen: set[bytes] = set()
        self.bound_tokens = 0

    def _push(self, t: float, kind: str, payload) -> None:
        heapq.heappush(self.events, (t, next(self.seq), kind, payload))

    def run(self) -> dict:
        while self.events:
            self.now, _, kind, payload = heapq.heappop(self.events)
            if kind == "arrive":
                self._arrive(payload)
            else:
                self._finish(*payload)
        return self.summary()

    def _arrive(self, p: Prepared) -> None:
        self.order.append(p)
        loads = [r.inflight for r in self.routers]
        mean = sum(loads) / len(loads)
        if mean > 0:
            self.imbalance.append(max(loads) / mean)
        r = self.upper.choose(p, self)
        self.reasons[getattr(self.upper, "last_reason", "-")] += 1
        router = self.routers[r]
        router.inflight += 1
        w = router.choose(p, self)
        worker = self.workers[w]
        worker.inflight += 1
        worker.queue.append((p, r, self.now))
        self._start(w)

    def _start(self, w: int) -> None:
        worker = self.workers[w]
        while worker.free and worker.queue:
            p, r, arrived = worker.queue.popleft()
            worker.free -= 1
            hit = min(worker.cache.cached_blocks(p.keys) * BLOCK_TOKENS, p.prompt_tokens)
            worker.cache.insert(p.keys)
            seen = next((i for i, k in enumerate(p.keys) if k not in self.seen), len(p.keys))
            self.bound_tokens += min(seen * BLOCK_TOKENS, p.prompt_tokens)
            self.seen.update(p.keys)
            m = self.model
            begin = max(self.now, worker.prefill_until) if m.serial_prefill else self.now
            first_token = begin + m.prefill_base + (p.prompt_tokens - hit) * m.prefill_per_token
            worker.prefill_until = first_token
            running = self.topo.batch - worker.free
            step = m.decode_step + m.step_over_knee * max(0, running - m.knee)
            self._push(first_token + p.req.output_tokens * step, "finish", (w, r, p, first_token - arrived, hit, arrived))

    def _finish(self, w: int, r: int, p: Prepared, ttft: float, hit: int, arrived: float) -> None:
        worker = self.workers[w]
        worker.free += 1
        worker.inflight -= 1
        self.routers[r].inflight -= 1
        self.records.append((ttft, self.now, p.prompt_tokens, hit, p.req.output_tokens, self.now - arrived))
        finished = getattr(self.upper, "finished", None)
        if finished:
            self.last_hit = hit  # what the worker reported cached (tokens), for policies that observe it
            finished(p, r, self)
        q = self.sessions[p.req.session]
        q.popleft()
        gap = self.rng.uniform(*self.overhead) if self.clients and self.overhead[1] else 0.0
        if q:
            self._push(self.now + (gap if self.clients else q[0].req.after), "arrive", q[0])
        elif self.clients and self.waiting:
            self._push(self.now + gap, "arrive", self.waiting.popleft()[0])
        self._start(w)

    def summary(self) -> dict:
        ttft = percentiles([r[0] for r in self.records], (50, 90))
        prompt = sum(r[2] for r in self.records)
        cached = sum(r[3] for r in self.records)
        span = max(r[1] for r in self.records)
        n = len(self.records)
        return {
            "requests": n,
            "hit_ratio": cached / prompt if prompt else 0.0,
            "reuse_bound": self.bound_tokens / prompt if prompt else 0.0,
            "ttft_p50_s": ttft["p50"],
            "ttft_p90_s": ttft["p90"],
            "latency_p90_s": percentiles([r[5] for r in self.records], (90,))["p90"],
            "throughput_rps": n / span,
            "output_tokens_per_s": sum(r[4] for r in self.records) / span,
            "imbalance_max_over_mean": statistics.mean(self.imbalance) if self.imbalance else 1.0,
            "reasons": {k: v / n for k, v in self.reasons.items()},
        }
