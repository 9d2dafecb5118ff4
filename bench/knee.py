"""The continuation knee scaled to the workers behind each router: is 8 per worker the right knee?

    .venv/bin/python -m bench.knee          → bench/results/knee.json (about 10 minutes)

``--continuation-knee`` (8, chosen by bench.sweep on 4 routers x 2 workers) lets a conversation's
next turn stay on the router holding its history until that router has more than 8 requests in
flight. FIELD-NOTES: a decode step costs the same from 1 to about 8 running requests *per worker*;
a router balancing W workers has W such batches, so the physics says its knee is 8 x W, which the
service cannot know (an upstream is one address to it). This puts that knee in the default's place
on every topology bench.eval runs (4x2, 3x3, 2x4, 8x1: 16, 24, 32, 8), with every rival of the
evaluation, both sets and their seeds, and counts the cells meeting both targets and the mean hit
ratio, beside the default's: the evidence behind the README's advice for routers of more workers.
The service's default is not changed by it (the real-stack records measured 8).
"""

from __future__ import annotations

import argparse
from functools import partial

from extproc.config import DEFAULTS, policy_config

from . import eval as ev
from .common import write
from .sim.engine import ServiceModel, Topology, parse_topology
from .sim.policies import MovingSessions

TOPOLOGIES = ("4x2", "3x3", "2x4", "8x1")
PER_WORKER = ServiceModel.knee  # a decode batch's knee on one worker (FIELD-NOTES, as the simulator models it)


def scaled(topo: Topology) -> int:
    """The knee for routers of ``topo.workers`` workers each."""
    return PER_WORKER * topo.workers


def policies(knee: int) -> dict[str, object]:
    """The default, the same rule with ``knee``, and every rival the targets name (fresh instances:
    they keep state)."""
    every = ev.eval_policies()
    out = {k: every[k] for k in dict.fromkeys((ev.DEFAULT, *ev.HIT_RIVALS, *ev.TTFT_RIVALS))}
    out[f"knee {knee}"] = MovingSessions(cfg=policy_config(continuation_knee=knee))
    return out


def tally(agg: dict[tuple, dict], policy: str, sets: list[str]) -> dict[str, dict]:
    """Per set: cells meeting both targets (and each), of how many, and the mean hit ratio."""
    verdicts = ev.verdicts(agg, policy)
    out = {}
    for st in sets:
        mine = [v for v in verdicts if v["set"] == st]
        out[st] = {"cells": len(mine), "both": sum(v["hit_ok"] and v["ttft_ok"] for v in mine), "hit_ok": sum(v["hit_ok"] for v in mine),
                   "ttft_ok": sum(v["ttft_ok"] for v in mine), "mean_hit_ratio": sum(v["hit_ratio"] for v in mine) / len(mine) if mine else 0.0}
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m bench.knee")
    p.add_argument("--topology", action="append", type=parse_topology, metavar="RxW", help=f"only these (repeatable; default {', '.join(TOPOLOGIES)})")
    a = p.parse_args(argv)
    default_knee, sets = DEFAULTS.continuation_knee, list(ev.SETS)
    rows = []
    for topo in a.topology or [parse_topology(t) for t in TOPOLOGIES]:
        knee = scaled(topo)
        agg = ev.cells(ev.simulate(ev.SETS, ev.RATES, policies=partial(policies, knee), topo=topo))
        row = {"topology": f"{topo.routers}x{topo.workers}", "knee": knee, "default_knee": default_knee,
               "default": tally(agg, ev.DEFAULT, sets), "scaled": tally(agg, f"knee {knee}", sets)}
        rows.append(row)
        for st in sets:
            d, s = row["default"][st], row["scaled"][st]
            print(f"{row['topology']} {st}: knee {default_knee} {d['both']} of {d['cells']} ({100 * d['mean_hit_ratio']:.2f} %), "
                  f"knee {knee} {s['both']} of {s['cells']} ({100 * s['mean_hit_ratio']:.2f} %)", flush=True)
    result = {"benchmark": "knee", "per_worker": PER_WORKER, "sets": {k: {"workloads": list(w), "seeds": list(s)} for k, (w, s) in ev.SETS.items()},
              "rates": list(ev.RATES), "rows": rows,
              "note": "cells meeting both targets (hit ratio within 1 point of the best rival, TTFT p90 at most 1.1x the best upper-layer "
                      "rival's) with the default's --continuation-knee and with 8 x the workers per router in its place"}
    print(f"wrote {write('knee' + ('-subset' if a.topology else ''), result)}")
    return result


if __name__ == "__main__":
    main()
