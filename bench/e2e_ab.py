"""The service's defaults against other flags, through the same real stack, run after run: is a
change of rule visible above the real stack's own noise?

    .venv/bin/python -m bench.e2e_ab --topology 3x3 --clients 12 --case shared_prefix \\
        --against "--new-prefix-weight 0 --new-prefix-knee 0" --repeats 3
                                   → bench/results/e2e_ab-shared_prefix12-3x3.json (about 10 minutes)

Why: bench.e2e runs each rule once per seed. On its shared-prefix case at 3 × 3 the same rule and
seed gave hit ratios from 0.56 to 0.83 from run to run through the real stack: which worker inside
a sglang-router a group's first request finds idle depends on timing no rule controls. Two rules
that differ there by a few points cannot be told apart by three runs. This runs both through
bench.e2e's stack (``_through_service``: real Envoy in duplex mode, the service, real
sglang-routers, fake workers), interleaved per seed with the order alternating, ``--repeats``
times for each seed, and reports each side's mean and spread, how many runs reached the case's
best, and the mean of the paired differences with a bootstrap interval.
"""

from __future__ import annotations

import argparse
import random
import shlex
import statistics
from dataclasses import replace

from extproc.dev.stack import work_dir

from .common import write
from .e2e import BASE, CASES, SEEDS, _prepared, _through_service, describe_setup, warm_up, worker_capacity
from .sim.engine import Topology, parse_topology

DEFAULTS_NAME = "defaults"


def run_once(case: str, clients: int, seed: int, topo: Topology, service_args: tuple[str, ...]) -> dict:
    """One closed-loop replay of one seed through a fresh stack."""
    kwargs, capacity = CASES[case]
    with work_dir(f"bench-e2e-ab-{case}-") as work:
        out = _through_service(_prepared(case, kwargs, seed), worker_capacity(capacity, topo), clients, work, service_args, topo)
    return {"hit_ratio": out["hit_ratio"], "latency_p50_s": out["latency_p50_s"], "latency_p90_s": out["latency_p90_s"],
            "failed": out["failed"], "requests_per_worker": out["requests_per_worker"]}


def bootstrap_interval(diffs: list[float], rounds: int = 4000, seed: int = 0) -> tuple[float, float]:
    """A 95 % percentile-bootstrap interval of the mean of ``diffs`` (paired runs resampled)."""
    rng = random.Random(seed)
    means = sorted(statistics.mean(rng.choices(diffs, k=len(diffs))) for _ in range(rounds))
    return means[int(0.025 * rounds)], means[int(0.975 * rounds) - 1]


def summarize(runs: list[dict]) -> dict:
    hits = [r["hit_ratio"] for r in runs]
    return {"hit_ratio_mean": statistics.mean(hits), "hit_ratio_min": min(hits), "hit_ratio_max": max(hits),
            "latency_p50_s_mean": statistics.mean(r["latency_p50_s"] for r in runs),
            "latency_p90_s_mean": statistics.mean(r["latency_p90_s"] for r in runs), "failed": sum(r["failed"] for r in runs)}


AT_BEST_POINTS = 0.5  # a run within this of the best run is at the best (sums of floats differ in the last digits)


def compare(pairs: list[tuple[dict, dict]]) -> dict:
    """Paired by seed and repeat: the defaults' run minus the other's."""
    diffs = [a["hit_ratio"] - b["hit_ratio"] for a, b in pairs]
    best = max(r["hit_ratio"] for pair in pairs for r in pair)
    near = best - AT_BEST_POINTS / 100
    low, high = bootstrap_interval(diffs)
    return {"hit_difference_points": 100 * statistics.mean(diffs), "interval_95_points": [100 * low, 100 * high],
            "latency_p90_ratio": statistics.mean(a["latency_p90_s"] for a, _ in pairs) / statistics.mean(b["latency_p90_s"] for _, b in pairs),
            "runs_at_best": {DEFAULTS_NAME: sum(a["hit_ratio"] >= near for a, _ in pairs), "against": sum(b["hit_ratio"] >= near for _, b in pairs)},
            "best_hit_ratio": best}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m bench.e2e_ab")
    p.add_argument("--topology", default=BASE, type=parse_topology, metavar="RxW", help="sglang-routers x fake workers each (default 2x2)")
    p.add_argument("--clients", type=int, default=12, metavar="N", help="concurrent clients (default 12)")
    p.add_argument("--case", required=True, choices=list(CASES))
    p.add_argument("--against", required=True, metavar="FLAGS", help='the service flags to compare the defaults with, e.g. "--new-prefix-window 0"')
    p.add_argument("--repeats", type=int, default=3, metavar="N", help="runs of each side per seed (default 3)")
    a = p.parse_args(argv)
    topo = replace(a.topology, batch=BASE.batch)
    against = tuple(shlex.split(a.against))
    pairs: list[tuple[dict, dict]] = []
    rows = []
    # the first run of a process runs cold: one replay that counts for neither side
    warm_up(a.case, a.clients, SEEDS[0], lambda: run_once(a.case, a.clients, SEEDS[0], topo, ()))
    for rep in range(a.repeats):
        for seed in SEEDS:
            first_defaults = (rep + seed) % 2 == 1  # alternate which side meets the machine first
            order = [(DEFAULTS_NAME, ()), ("against", against)]
            got = {}
            for side, args in order if first_defaults else reversed(order):
                got[side] = run_once(a.case, a.clients, seed, topo, args)
                print(f"{a.case} x{a.clients} seed {seed} repeat {rep} {side}: hit {got[side]['hit_ratio']:.3f}, "
                      f"latency p90 {got[side]['latency_p90_s'] * 1000:.0f} ms, per worker {got[side]['requests_per_worker']}", flush=True)
            pairs.append((got[DEFAULTS_NAME], got["against"]))
            rows.append({"seed": seed, "repeat": rep, "defaults_first": first_defaults, **got})
    result = {
        "benchmark": "e2e_ab", "case": a.case, "clients": a.clients, "against_flags": list(against), "repeats": a.repeats, "seeds": list(SEEDS),
        "description": f"{describe_setup(topo)} The service's defaults against `{a.against}`, {a.repeats} runs of each per seed, interleaved, after one warm-up run not counted.",
        "topology": {"routers": topo.routers, "workers": topo.workers, "router_threshold": topo.router_threshold},
        DEFAULTS_NAME: summarize([d for d, _ in pairs]), "against": summarize([o for _, o in pairs]), "comparison": compare(pairs), "rows": rows,
    }
    c = result["comparison"]
    print(f"defaults {result[DEFAULTS_NAME]['hit_ratio_mean']:.3f} ({result[DEFAULTS_NAME]['hit_ratio_min']:.3f}–{result[DEFAULTS_NAME]['hit_ratio_max']:.3f}), "
          f"against {result['against']['hit_ratio_mean']:.3f} ({result['against']['hit_ratio_min']:.3f}–{result['against']['hit_ratio_max']:.3f}); "
          f"difference {c['hit_difference_points']:+.1f} points (95 % {c['interval_95_points'][0]:+.1f} to {c['interval_95_points'][1]:+.1f}); "
          f"runs at the best: {c['runs_at_best'][DEFAULTS_NAME]} and {c['runs_at_best']['against']} of {len(pairs)}; latency p90 ratio {c['latency_p90_ratio']:.2f}")
    print(f"wrote {write(f'e2e_ab-{a.case}{a.clients}-{topo.routers}x{topo.workers}', result)}")
    return result


if __name__ == "__main__":
    main()
