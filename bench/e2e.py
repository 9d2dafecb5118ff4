"""The simulator checked against the real stack: the same requests, in the same order, through
real Envoy, the service, real sglang-routers and fake workers; hit ratios compared.

    .venv/bin/python -m bench.e2e          → bench/results/e2e.json

Requests are sent one at a time (no load, so neither layer balances by load: what remains to
compare is prefix matching, tie-breaks and the caches), and the simulator runs the same workload
slowed down until no two requests overlap. The hit ratio through the stack is read from the
workers' reported ``cached_tokens``. The service and the simulated policy both run with
``--tie-break first``, so that a miss is placed the same way in both (random placement would make
the two differ by luck, not by model); each case runs with three workload seeds.
"""

from __future__ import annotations

import random
import tempfile
import time
from pathlib import Path

import openai

from extproc.config import policy_config
from extproc.dev.stack import ENVOY_DIR, Ports, Stack

from .common import write
from .sim.engine import ServiceModel, Sim, Topology, prepare
from .sim.policies import PrefixRouter
from .sim.workloads import WORKLOADS

CASES = {
    # workload, generator arguments, cache capacity per worker (tokens)
    "multi_turn": ({"sessions": 16, "turns": 5}, 6000),
    "structural_edits": ({"sessions": 12, "turns": 6}, 6000),
    "shared_prefix": ({"groups": 8, "prompts": 6}, 8000),
}


def main() -> dict:
    rows = []
    for name, (kwargs, capacity) in CASES.items():
        for seed in (3, 4, 5):
            rows.append(replay(name, kwargs, capacity, seed))
    summary = []
    for name in CASES:
        mine = [r for r in rows if r["workload"] == name]
        sim = sum(r["simulated_hit_ratio"] for r in mine) / len(mine)
        real = sum(r["stack_hit_ratio"] for r in mine) / len(mine)
        summary.append({"workload": name, "simulated_mean": sim, "stack_mean": real, "difference_points": 100 * (real - sim)})
        print(f"{name}: mean over seeds simulated {sim:.3f}, through the stack {real:.3f} ({100 * (real - sim):+.1f} points)")
    result = {"benchmark": "e2e", "rows": rows, "summary": summary}
    print(f"wrote {write('e2e', result)}")
    return result


def replay(name: str, kwargs: dict, capacity: int, seed: int) -> dict:
    """One seed of one case: simulate, then send the same requests in the same order through the stack."""
    prepared = prepare(WORKLOADS[name](random.Random(seed), **kwargs))
    sim = Sim(prepared, PrefixRouter(policy_config(tie_break="first")), Topology(routers=2, workers=2, batch=64, capacity_tokens=capacity), ServiceModel(), seed=seed, rate_scale=0.001)
    simulated = sim.run()
    work = Path(tempfile.mkdtemp(prefix=f"bench-e2e-{name}-"))
    stack = Stack(Ports.free(2, 2), envoy_config=ENVOY_DIR / "duplex.yaml", worker_args=["--capacity-tokens", str(capacity), "--output-tokens", "4"],
                  service_args=["--tie-break", "first"], workdir=work)
    prompt = cached = 0
    t0 = time.time()
    with stack:
        c = openai.OpenAI(base_url=stack.base_url, api_key="unused", max_retries=0, timeout=60)
        for p in sim.order:
            r = c.chat.completions.create(model="fake-model", messages=p.req.messages, tools=p.req.tools or openai.NOT_GIVEN, max_tokens=4)
            prompt += r.usage.prompt_tokens
            cached += r.usage.prompt_tokens_details.cached_tokens
    real = cached / prompt
    row = {"workload": name, "seed": seed, "requests": len(prepared), "capacity_tokens": capacity, "simulated_hit_ratio": simulated["hit_ratio"],
           "stack_hit_ratio": real, "difference_points": 100 * (real - simulated["hit_ratio"]), "replay_seconds": time.time() - t0}
    print(f"{name} seed {seed}: {len(prepared)} requests, simulated {simulated['hit_ratio']:.3f}, through the stack {real:.3f} ({row['difference_points']:+.1f} points)", flush=True)
    return row


if __name__ == "__main__":
    main()
