"""The sweep behind the cost rule's defaults, on the tuning set only: ``--inflight-slack`` x
``--inflight-cost-chars``, every tuning workload x capacity level x rate x seed (bench.eval's
cells), against the same rivals as the evaluation.

    .venv/bin/python -m bench.sweep       → bench/results/sweep.json (about 10 minutes)

The choice: the setting meeting both targets of bench.eval (hit ratio within a point of the best
rival, TTFT p90 within 1.1x of the best upper-layer rival) in the most cells; ties to the smaller
mean hit-ratio deficit. The held-out set is never run here. The choice replaces the shipped
defaults only if bench.eval's held-out set confirms it (as ``prefix-router/tuning-winner``); the
winner of this run (slack 3, 1,536 characters) did not, and the defaults stayed (README).
"""

from __future__ import annotations

import statistics

from extproc.config import DEFAULTS, policy_config

from .common import write
from .eval import DEFAULT, HIT_RIVALS, SETS, SINGLE, TTFT_RIVALS, RATES, cells, simulate, verdicts
from .sim.policies import PrefixRouter, Single, upper_policies

SLACKS = (0, 1, 2, 3, 4, 6)
WEIGHTS = (512, 768, 1024, 1536, 2048, 3072)


def name(slack: int, weight: int) -> str:
    return f"slack={slack},chars={weight}"


def policies() -> dict:
    """Fresh instances for one run: the rivals and every setting of the grid."""
    rivals = {p: u for p, u in upper_policies().items() if p in HIT_RIVALS + TTFT_RIVALS}
    grid = {name(s, w): PrefixRouter(policy_config(inflight_slack=s, inflight_cost_chars=w)) for s in SLACKS for w in WEIGHTS}
    return {**rivals, SINGLE: Single(), **grid}


def main() -> dict:
    tuning = {"tuning": SETS["tuning"]}
    rows = simulate(tuning, RATES, policies=policies)
    agg = cells(rows)
    table = []
    for s in SLACKS:
        for w in WEIGHTS:
            n = name(s, w)
            as_default = {(k[0], k[1], k[2], k[3], DEFAULT if k[4] == n else k[4]): v for k, v in agg.items() if k[4] != DEFAULT}
            v = verdicts(as_default)
            per_workload = {wl: statistics.mean(100 * (x["hit_ratio"] - x["best_rival_hit"]) for x in v if x["workload"] == wl) for wl in SETS["tuning"][0]}
            table.append({
                "inflight_slack": s, "inflight_cost_chars": w, "cells": len(v),
                "both": sum(x["hit_ok"] and x["ttft_ok"] for x in v), "hit_ok": sum(x["hit_ok"] for x in v), "ttft_ok": sum(x["ttft_ok"] for x in v),
                "mean_hit_deficit_points": statistics.mean(100 * (x["hit_ratio"] - x["best_rival_hit"]) for x in v),
                "worst_workload_hit_deficit_points": min(per_workload.values()),
                "mean_ttft_ratio": statistics.mean(x["ttft_p90_s"] / x["best_rival_ttft_p90_s"] for x in v),
            })
    table.sort(key=lambda r: (-r["both"], -r["mean_hit_deficit_points"]))
    for r in table[:10]:
        print(f"slack {r['inflight_slack']} chars {r['inflight_cost_chars']:5d}: both {r['both']}/{r['cells']} (hit {r['hit_ok']}, TTFT {r['ttft_ok']}), "
              f"hit {r['mean_hit_deficit_points']:+.2f} pts (worst workload {r['worst_workload_hit_deficit_points']:+.2f}), TTFT x{r['mean_ttft_ratio']:.2f}")
    chosen = table[0]
    shipped = {"inflight_slack": DEFAULTS.inflight_slack, "inflight_cost_chars": DEFAULTS.inflight_cost_chars}
    print(f"chosen: slack {chosen['inflight_slack']}, chars {chosen['inflight_cost_chars']}; shipped defaults: {shipped}")
    path = write("sweep", {"benchmark": "sweep", "set": "tuning", "workloads": list(SETS["tuning"][0]), "seeds": list(SETS["tuning"][1]),
                           "rates": list(RATES), "chosen": {k: chosen[k] for k in ("inflight_slack", "inflight_cost_chars")}, "shipped": shipped,
                           "table": table})
    print(f"wrote {path}")
    return {"chosen": chosen, "table": table}


if __name__ == "__main__":
    main()
