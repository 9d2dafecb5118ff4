"""The sweep behind ``--inflight-cost-chars``'s default: the cost rule at several weights of one
request in flight, on six workloads x three capacities x three rates.

    .venv/bin/python -m bench.sweep       → bench/results/sweep.json (about 2 minutes)
"""

from __future__ import annotations

import random
import statistics

from extproc.config import policy_config

from .common import write
from .eval import SEED, capacities
from .sim.engine import ServiceModel, Sim, Topology, prepare
from .sim.policies import PrefixRouter
from .sim.workloads import WORKLOADS

WEIGHTS = (256, 512, 768, 1024, 1536, 2048, 3072)
NAMES = ("shared_prefix", "multi_turn", "taubench", "sweagent", "loogle", "structural_edits")


def main() -> dict:
    cells = []
    for name in NAMES:
        prepared = prepare(WORKLOADS[name](random.Random(SEED)))
        for cap_name, cap in capacities(prepared, quick=False).items():
            for rate in (1.0, 2.0, 4.0):
                for w in WEIGHTS:
                    s = Sim(prepared, PrefixRouter(policy_config(inflight_cost_chars=w)), Topology(capacity_tokens=cap), ServiceModel(), seed=SEED, rate_scale=rate).run()
                    cells.append({"workload": name, "capacity": cap_name, "rate": rate, "inflight_cost_chars": w,
                                  "hit_ratio": s["hit_ratio"], "ttft_p90_s": s["ttft_p90_s"], "throughput_rps": s["throughput_rps"]})
    summary = []
    for w in WEIGHTS:
        mine = [c for c in cells if c["inflight_cost_chars"] == w]
        summary.append({"inflight_cost_chars": w, **{k: statistics.mean(c[k] for c in mine) for k in ("hit_ratio", "ttft_p90_s", "throughput_rps")}})
        print(f"{w:5d}: hit {summary[-1]['hit_ratio']:.3f}  TTFT p90 {summary[-1]['ttft_p90_s']:.2f} s  {summary[-1]['throughput_rps']:.2f} req/s", flush=True)
    path = write("sweep", {"benchmark": "sweep", "seed": SEED, "summary": summary, "cells": cells})
    print(f"wrote {path}")
    return {"summary": summary}


if __name__ == "__main__":
    main()
