"""Observed cache hits fed back to the tree, by simulation: how much of the gap between the default
rule and the same rule fed the workers' true caches (``true-cache-cost``) a sample of reported
``cached_tokens`` closes, with tight caches.

    .venv/bin/python -m bench.observed     → bench/results/observed.json (about 4 minutes)

Policies: the default; ``ObservedHits`` (bench/sim/policies.py, the service's own functions from
extproc.feedback), unguarded (any prediction counts, a stale report cuts 10 % of what the upstream
holds) with every request reported and with one in ten, and guarded — the rule ``--observe-feedback``
ships (predictions of 1,024+ characters, 2 %) — with every request and one in ten;
``true-cache-cost``. The constants (a report below half the prediction is stale, 2 % growth per
other report) were fixed before the first run, not swept. Both sets of bench.eval, their seeds,
capacity levels ``quarter`` and ``sixteenth``, rates x1 and x4. The simulator's answer to whether
the service should correct its tree by default.
"""

from __future__ import annotations

import random
import statistics
from concurrent.futures import ProcessPoolExecutor

from extproc.feedback import FeedbackRule

from .common import write
from .eval import SETS, capacities
from .sim.engine import ServiceModel, Sim, Topology, prepare
from .sim.policies import ObservedHits, PrefixRouter, TrueCache
from .sim.workloads import WORKLOADS

LEVELS = ("quarter", "sixteenth")
RATES = (1.0, 4.0)
# unguarded: any prediction counts and a stale report cuts 10 %; the service's rule
# (--observe-feedback, FeedbackRule's defaults): predictions of 1,024+ characters, 2 %
UNGUARDED = FeedbackRule(min_predicted=0, shrink=0.1)
# the cost rule without moving sessions (--no-move-evicted-sessions; the default until sessions were
# moved by default): the feedback corrects the tree, so it is measured against the rule it corrects,
# and TrueCache is that rule fed the true caches
POLICIES = {
    "prefix-router": lambda seed: PrefixRouter(),
    "unguarded, every request": lambda seed: ObservedHits(sample=1.0, seed=seed, rule=UNGUARDED),
    "unguarded, 1 in 10": lambda seed: ObservedHits(sample=0.1, seed=seed, rule=UNGUARDED),
    "--observe-feedback, every request": lambda seed: ObservedHits(sample=1.0, seed=seed),
    "--observe-feedback, 1 in 10": lambda seed: ObservedHits(sample=0.1, seed=seed),
    "true-cache-cost": lambda seed: TrueCache(),
}


def unit(args: tuple[str, str, int]) -> list[dict]:
    st, name, seed = args
    prepared = prepare(WORKLOADS[name](random.Random(seed)))
    caps = capacities(prepared)
    rows = []
    for level in LEVELS:
        if level not in caps:
            continue
        for rate in RATES:
            for policy, make in POLICIES.items():
                s = Sim(prepared, make(seed), Topology(capacity_tokens=caps[level]), ServiceModel(), seed=seed, rate_scale=rate).run()
                rows.append({"set": st, "workload": name, "seed": seed, "capacity": level, "rate": rate, "policy": policy,
                             "hit_ratio": s["hit_ratio"], "ttft_p90_s": s["ttft_p90_s"]})
    return rows


def main() -> dict:
    units = [(st, w, s) for st, (ws, seeds) in SETS.items() for w in ws for s in seeds]
    units.sort(key=lambda u: u[1] != "mooncake")
    rows: list[dict] = []
    with ProcessPoolExecutor(2) as ex:
        for got in ex.map(unit, units):
            rows.extend(got)
    summary = []
    for st, (ws, _) in SETS.items():
        for w in ws:
            mine = [r for r in rows if r["workload"] == w]
            mean = {p: statistics.mean(r["hit_ratio"] for r in mine if r["policy"] == p) for p in POLICIES}
            ttft = {p: statistics.mean(r["ttft_p90_s"] for r in mine if r["policy"] == p) for p in POLICIES}
            gap = mean["true-cache-cost"] - mean["prefix-router"]
            row = {"set": st, "workload": w, "hit_ratio": mean, "ttft_p90_s": ttft, "gap_points": 100 * gap}
            for p in (q for q in POLICIES if q not in ("prefix-router", "true-cache-cost")):  # the fed-back ones
                row[f"closed: {p}"] = (mean[p] - mean["prefix-router"]) / gap if abs(gap) > 0.005 else None
            summary.append(row)
            print(f"{st:8s} {w:17s} " + ", ".join(f"{q} {100 * v:.1f}" for q, v in mean.items()), flush=True)
    path = write("observed", {"benchmark": "observed", "levels": list(LEVELS), "rates": list(RATES), "rows": rows, "summary": summary})
    print(f"wrote {path}")
    return {"summary": summary}


if __name__ == "__main__":
    main()
