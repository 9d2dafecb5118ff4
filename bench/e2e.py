"""The simulator checked against the real stack under load: the same sessions through real Envoy,
the service (its defaults: random tie-breaks, the cost rule), real sglang-routers and fake workers,
with 8 and 16 concurrent clients; hit ratios compared.

    .venv/bin/python -m bench.e2e          → bench/results/e2e.json (about 8 minutes)

Each client sends one session's turns back to back, then takes the next session; the simulator
runs the same closed loop (``Sim(clients=...)``) with the fake workers' timing (prefill per
uncached token, a delay per output token, no batch limit, prefills overlapping). The hit ratio
through the stack is read from the workers' reported ``cached_tokens``. Random tie-breaks and the
real stack's timing make single runs differ, so each case is the mean of three seeds on both
sides, and the agreement is judged against a stated tolerance (``TOLERANCE_POINTS``).
"""

from __future__ import annotations

import random
import statistics
import tempfile
import threading
import time
from collections import deque
from pathlib import Path

import openai

from extproc.dev.stack import ENVOY_DIR, Ports, Stack

from .common import write
from .sim.engine import ServiceModel, Sim, Topology, prepare
from .sim.policies import PrefixRouter
from .sim.workloads import WORKLOADS

CASES = {
    # workload, generator arguments, cache capacity per worker (tokens)
    "multi_turn": ({"sessions": 24, "turns": 5}, 6000),
    "structural_edits": ({"sessions": 16, "turns": 6}, 6000),
    "shared_prefix": ({"groups": 8, "prompts": 8}, 8000),
    "dialogue": ({"sessions": 64}, 3000),
}
CONCURRENCY = (8, 16)
SEEDS = (3, 4, 5)
TOLERANCE_POINTS = 3.0
OUTPUT_TOKENS = 8
TOKEN_DELAY = 0.02  # s per output token at the fake workers
PREFILL_DELAY = 0.00005  # s per uncached prompt token
FAKE_WORKER = ServiceModel(prefill_base=0.0, prefill_per_token=PREFILL_DELAY, decode_step=TOKEN_DELAY, knee=1 << 30, step_over_knee=0.0,
                           serial_prefill=False)


def main() -> dict:
    rows = []
    for name, (kwargs, capacity) in CASES.items():
        for clients in CONCURRENCY:
            for seed in SEEDS:
                rows.append(replay(name, kwargs, capacity, clients, seed))
    summary = []
    for name in CASES:
        for clients in CONCURRENCY:
            mine = [r for r in rows if r["workload"] == name and r["concurrency"] == clients]
            sim = statistics.mean(r["simulated_hit_ratio"] for r in mine)
            real = statistics.mean(r["stack_hit_ratio"] for r in mine)
            summary.append({"workload": name, "concurrency": clients, "simulated_mean": sim, "stack_mean": real, "difference_points": 100 * (real - sim),
                            "simulated_range": [min(r["simulated_hit_ratio"] for r in mine), max(r["simulated_hit_ratio"] for r in mine)],
                            "stack_range": [min(r["stack_hit_ratio"] for r in mine), max(r["stack_hit_ratio"] for r in mine)]})
            print(f"{name} x{clients}: simulated {sim:.3f}, through the stack {real:.3f} ({100 * (real - sim):+.1f} points)", flush=True)
    within = sum(abs(s["difference_points"]) <= TOLERANCE_POINTS for s in summary)
    description = (f"Closed loop of 8 and 16 clients, random tie-breaks on both sides, the service's defaults; 2 sglang-routers x 2 fake workers "
                   f"(cache per worker in the table, {OUTPUT_TOKENS} output tokens at {TOKEN_DELAY * 1000:g} ms each, {PREFILL_DELAY * 1e6:g} µs per uncached "
                   f"prompt token); mean of seeds {', '.join(map(str, SEEDS))}. Tolerance: {TOLERANCE_POINTS:g} points; {within} of {len(summary)} cases within.")
    result = {"benchmark": "e2e", "description": description, "tolerance_points": TOLERANCE_POINTS, "rows": rows, "summary": summary}
    print(description)
    print(f"wrote {write('e2e', result)}")
    return result


def replay(name: str, kwargs: dict, capacity: int, clients: int, seed: int) -> dict:
    """One seed of one case at one concurrency: simulate, then replay the same sessions through the stack."""
    prepared = prepare(WORKLOADS[name](random.Random(seed), **kwargs))
    for p in prepared:
        p.req.output_tokens = OUTPUT_TOKENS
    simulated = Sim(prepared, PrefixRouter(), Topology(routers=2, workers=2, batch=1 << 20, capacity_tokens=capacity), FAKE_WORKER,
                    seed=seed, clients=clients).run()
    sessions: deque[list] = deque()
    by_session: dict[str, list] = {}
    for p in prepared:
        by_session.setdefault(p.req.session, []).append(p)
    sessions.extend(by_session.values())
    work = Path(tempfile.mkdtemp(prefix=f"bench-e2e-{name}-"))
    worker_args = ["--capacity-tokens", str(capacity), "--output-tokens", str(OUTPUT_TOKENS), "--token-delay", str(TOKEN_DELAY),
                   "--prefill-delay-per-token", str(PREFILL_DELAY)]
    stack = Stack(Ports.free(2, 2), envoy_config=ENVOY_DIR / "duplex.yaml", worker_args=worker_args, workdir=work)
    totals = {"prompt": 0, "cached": 0, "failed": 0}
    lock = threading.Lock()
    t0 = time.time()

    def client() -> None:
        c = openai.OpenAI(base_url=stack.base_url, api_key="unused", max_retries=0, timeout=120)
        while True:
            with lock:
                if not sessions:
                    return
                turns = sessions.popleft()
            for p in turns:
                try:
                    r = c.chat.completions.create(model="fake-model", messages=p.req.messages, tools=p.req.tools or openai.NOT_GIVEN, max_tokens=OUTPUT_TOKENS)
                except openai.APIError:
                    with lock:
                        totals["failed"] += 1
                    continue
                with lock:
                    totals["prompt"] += r.usage.prompt_tokens
                    totals["cached"] += r.usage.prompt_tokens_details.cached_tokens

    with stack:
        threads = [threading.Thread(target=client) for _ in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    real = totals["cached"] / totals["prompt"]
    row = {"workload": name, "concurrency": clients, "seed": seed, "requests": len(prepared), "failed": totals["failed"], "capacity_tokens": capacity,
           "simulated_hit_ratio": simulated["hit_ratio"], "stack_hit_ratio": real, "difference_points": 100 * (real - simulated["hit_ratio"]),
           "replay_seconds": time.time() - t0}
    print(f"{name} x{clients} seed {seed}: {len(prepared)} requests ({totals['failed']} failed), simulated {simulated['hit_ratio']:.3f}, "
          f"through the stack {real:.3f} ({row['difference_points']:+.1f} points)", flush=True)
    return row


if __name__ == "__main__":
    main()
