"""The real stack's rivals, simulated: does the simulator reproduce what bench.e2e measured for them?

    .venv/bin/python -m bench.e2e_rivals --topology 3x3 --clients 12
                                           → bench/results/e2e_rivals-3x3.json (seconds)
    .venv/bin/python -m bench.e2e_rivals --topology 2x2 --clients 8,16
                                           → bench/results/e2e_rivals-2x2.json
    .venv/bin/python -m bench.e2e_rivals --topology 3x3 --clients 12 --router-cache-threshold 0.5
                                           → bench/results/e2e_rivals-3x3-threshold0.5.json (every router at 0.5)
    .venv/bin/python -m bench.e2e_rivals --topology 4x2 --clients 24 --seeds 200-299
                                           → bench/results/e2e_rivals-4x2-seeds200to299.json (about 10 minutes)
    .venv/bin/python -m bench.e2e_rivals --topology 3x3 --clients 12 --serial-prefill
                                           → bench/results/e2e_rivals-3x3-serial.json (workers running one prefill
                                             at a time, against bench.e2e --serial-prefill's run)
    .venv/bin/python -m bench.e2e_rivals --topology 3x3 --clients 12 --batch 4
                                           → bench/results/e2e_rivals-3x3-batch4.json (workers running 4 requests
                                             at once, against bench.e2e --batch 4's run)

bench.e2e checks the simulator against the real stack for prefix-router's rule only; its rivals
(round robin, least request and the session hash over the routers, the service's other rules, the
one-layer reference) are measured through real processes and never simulated. This runs them in
the simulator on the same cases, seeds, cache sizes and closed loop, twice: in lockstep (the
clients send the moment an answer comes back, as bench.e2e's replay simulates), and with the
per-request overhead a real stack adds (``STACK_OVERHEAD_S``), next to what bench.e2e measured
through the real stack on that set-up.

Why: on the SWE-agent trace at 3x3, round robin beat prefix-router through the real stack by 12
points, while the lockstep simulator gave both the same hit ratio. In lockstep, 12 clients over 3
routers reach the balancer in the same order every round, so round robin sends each conversation
to one router every time: a sticky rule no real stack plays. With the overhead it scatters the
turns as the real stack does, and the simulator reproduces the measured figures.

``--seeds``: the same on other seeds, as many as wanted, with each rival paired with prefix-router
seed by seed (the mean difference and its standard error). Why: a seed of a case moves a rule's hit
ratio by more than the rules differ (the short dialogues on 4x2 with 24 clients: 0.24-0.48 under any
rule), so bench.e2e's three seeds through the real stack cannot order the rules there; a hundred
simulated ones can, and say whether a real-stack miss is the rule's or the draw's.
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import replace
from functools import partial

from extproc.config import policy_config

from .common import RESULTS, parse_seeds, seeds_words, write
from .e2e import (BASE, CASES, SEEDS, SIDE_BY_SIDE, FakeWorkers, _prepared, add_worker_options, describe_setup, parse_clients, results_name,
                  worker_capacity, workers_from)
from .sim.engine import Sim, Topology, parse_topology
from .sim.policies import LeastRequest, MovingSessions, PrefixRouter, RoundRobin, SessionHash, Single

# What a real stack adds to each request beyond the fake workers' own time, seconds: measured here
# as request latency through one real sglang-router minus the workers' model (SWE-agent, 4 clients):
# 13-37 ms from p10 to p90. Its spread, not its size, is what breaks the lockstep.
STACK_OVERHEAD_S = (0.010, 0.040)
# the seeds `make bench` pairs the rivals on (none of them looked at while a default was chosen)
MANY_SEEDS = "200-299"

# name in bench.e2e's results → the simulator's policy
POLICIES = {
    # the default follows sessions, reading the turns whose report may move one (duplex mode)
    "prefix-router": MovingSessions,
    "envoy round robin": RoundRobin,
    "envoy least request": LeastRequest,
    "one-layer": Single,
    "envoy session hash": SessionHash,
    # the rules alone, as bench.e2e runs them (no session followed)
    "hit-choice creator": partial(PrefixRouter, policy_config(hit_choice="creator")),
    "hit-choice least_loaded": partial(PrefixRouter, policy_config(hit_choice="least_loaded")),
    "sglang-router 0.3.2 rule": partial(PrefixRouter, policy_config(hit_choice="creator", tie_break="first")),
    # the default without following sessions (the default until this round), and with every response
    # read (bench.e2e runs both through the stack beside the rivals, never among them: OPT_INS)
    "prefix-router --no-move-evicted-sessions": PrefixRouter,
    "prefix-router --observe-sample 1": partial(MovingSessions, sample=1.0),
}


def simulate(name: str, policy: str, topo: Topology, clients: int, overhead: tuple[float, float],
             seeds: tuple[int, ...] = SEEDS, workers: FakeWorkers = SIDE_BY_SIDE) -> tuple[list[float], list[float], list[float]]:
    """Hit ratio and request latency p90 (seconds) per seed of one case under one policy, and
    (prefix-router only) the match rates its ``prefix_router_new_session_match_rate`` would have
    observed, every seed's together."""
    kwargs, capacity = CASES[name]
    t = replace(topo, capacity_tokens=worker_capacity(capacity, topo))
    if policy == "one-layer":
        t = replace(t, routers=1, workers=topo.routers * topo.workers)
    hits, latencies, rates = [], [], []
    for seed in seeds:
        upper = POLICIES[policy]()
        out = Sim(_prepared(name, kwargs, seed), upper, t, workers.model(), seed=seed, clients=clients, overhead=overhead).run()
        hits.append(out["hit_ratio"])
        latencies.append(out["latency_p90_s"])
        rates += getattr(upper, "new_session_rates", [])
    return hits, latencies, rates


def new_sessions(rates: list[float], threshold: float) -> dict | None:
    """What the new sessions' match rates say of the routers' threshold: how many, their median,
    and the share above it (the sessions each router runs on the worker holding their prefix)."""
    if not rates:
        return None
    return {"requests": len(rates), "median": statistics.median(rates), "over_router_threshold": sum(r > threshold for r in rates) / len(rates)}


def paired(mine: list[float], theirs: list[float]) -> dict:
    """A rival against prefix-router on the same seeds: its hit ratio minus prefix-router's, in
    points, seed by seed; the mean, its standard error (none for one seed), and the seeds where
    the rival is ahead and behind."""
    diffs = [100 * (t - m) for m, t in zip(mine, theirs, strict=True)]
    se = statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else None
    return {"mean_points": statistics.mean(diffs), "standard_error_points": se,
            "ahead": sum(d > 0 for d in diffs), "behind": sum(d < 0 for d in diffs), "seeds": len(diffs)}


def measured(topo: Topology, clients: int, seeds: tuple[int, ...] | None = None,
             workers: FakeWorkers = SIDE_BY_SIDE) -> dict[str, dict[str, tuple[float, float]]]:
    """What bench.e2e measured through the real stack on this set-up, per case and policy: hit
    ratio and request latency p90 (seconds). The default's is its latest measurement (``again``,
    from a run of the other settings, when the file has one: the default of the run on record may
    be an earlier one). ``seeds``: the run on those seeds (``bench.e2e --seeds``), if there is one."""
    path = RESULTS / f"{results_name(topo, seeds, workers)}.json"
    if not path.exists():
        return {}
    out: dict[str, dict[str, tuple[float, float]]] = {}
    for row in json.loads(path.read_text())["summary"]:
        if row["concurrency"] == clients:
            mine = row["again"] if "again" in row else {"hit_ratio": row["stack_mean"], "latency_p90_s": row["stack_latency_p90_s"]}
            out[row["workload"]] = {k: (v["hit_ratio"], v["latency_p90_s"])
                                    for k, v in (("prefix-router", mine), *row["rivals"].items(), *row.get("opt_ins", {}).items())}
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m bench.e2e_rivals")
    p.add_argument("--topology", default=parse_topology("3x3"), type=parse_topology, metavar="RxW", help="sglang-routers x fake workers each")
    p.add_argument("--clients", default=(12,), metavar="N[,N...]", type=parse_clients,
                   help="concurrent clients (the closed loop), one case each")
    p.add_argument("--case", action="append", choices=list(CASES), help="only these cases (repeatable)")
    p.add_argument("--router-cache-threshold", type=float, default=BASE.router_threshold, metavar="X",
                   help="every simulated sglang-router's --cache-threshold (its default 0.3); the real figures are read from the "
                        "bench.e2e run at the same threshold")
    p.add_argument("--seeds", type=parse_seeds, metavar="N,N,...|A-B",
                   help=f"these seeds instead of bench.e2e's {','.join(map(str, SEEDS))} (a range: A-B), each rival paired with "
                        "prefix-router seed by seed; results go to e2e_rivals-RxW-seeds....json")
    add_worker_options(p, "e2e_rivals")  # against bench.e2e's run on the same workers
    a = p.parse_args(argv)
    workers = workers_from(p, a)
    seeds = a.seeds or SEEDS
    topo = replace(workers.topology(a.topology), router_threshold=a.router_cache_threshold)
    cases = []
    for clients in a.clients:
        real = measured(topo, clients, a.seeds, workers)
        for name in CASES:
            if a.case and name not in a.case:
                continue
            row = {"workload": name, "concurrency": clients, "policies": {}}
            for policy in POLICIES:
                lockstep, lockstep_p90, _ = simulate(name, policy, topo, clients, (0.0, 0.0), seeds, workers)
                overhead, overhead_p90, rates = simulate(name, policy, topo, clients, STACK_OVERHEAD_S, seeds, workers)
                if policy == "prefix-router":
                    row["new_sessions"] = new_sessions(rates, topo.router_threshold)
                stack = real.get(name, {}).get(policy)
                row["policies"][policy] = {"lockstep": statistics.mean(lockstep), "lockstep_range": [min(lockstep), max(lockstep)],
                                           "overhead": statistics.mean(overhead), "overhead_range": [min(overhead), max(overhead)],
                                           "stack": None if stack is None else stack[0],
                                           # request latency p90 (mean of the seeds'): the simulator times the workers' model alone,
                                           # the stack adds its own per-request overhead, so compare policies within a column
                                           "lockstep_latency_p90_s": statistics.mean(lockstep_p90),
                                           "overhead_latency_p90_s": statistics.mean(overhead_p90),
                                           "stack_latency_p90_s": None if stack is None else stack[1],
                                           "overhead_by_seed": overhead}
                r = row["policies"][policy]
                print(f"{name} x{clients} {policy}: lockstep {r['lockstep']:.3f}, with overhead {r['overhead']:.3f}, "
                      f"stack {'-' if r['stack'] is None else format(r['stack'], '.3f')}; latency p90 with overhead "
                      f"{1000 * r['overhead_latency_p90_s']:.0f} ms", flush=True)
            mine = row["policies"]["prefix-router"]["overhead_by_seed"]
            row["paired"] = {policy: paired(mine, r["overhead_by_seed"]) for policy, r in row["policies"].items() if policy != "prefix-router"}
            if row.get("new_sessions"):
                n = row["new_sessions"]
                print(f"{name} x{clients} prefix-router's new sessions (with overhead): {n['requests']}, median match rate {n['median']:.2f}, "
                      f"{100 * n['over_router_threshold']:.0f} % over the routers' {topo.router_threshold:g}", flush=True)
            cases.append(row)
    on = f"other seeds, {seeds_words(seeds)} (`--seeds`)" if a.seeds else f"seeds ({seeds_words(seeds)})"
    description = (f"Closed loop of {' and '.join(map(str, a.clients))} clients on {describe_setup(topo)}, bench.e2e's cases, "
                   f"cache sizes and {on}, each figure the mean of the seeds'; the simulator in lockstep and with "
                   f"{STACK_OVERHEAD_S[0] * 1000:g}-{STACK_OVERHEAD_S[1] * 1000:g} ms of overhead per request"
                   f"{workers.words}, against bench.e2e's "
                   f"measurement through real processes ({results_name(topo, a.seeds, workers)}.json, where run).")
    result = {"benchmark": "e2e_rivals", "description": description,
              "topology": {"routers": topo.routers, "workers": topo.workers, "router_threshold": topo.router_threshold},
              "clients": list(a.clients), "overhead_s": list(STACK_OVERHEAD_S), "seeds": list(seeds), "fresh_seeds": list(a.seeds) if a.seeds else None,
              "serial_prefill": workers.serial_prefill, "batch": workers.batch, "cases": cases}
    print(description)
    suffix = "-subset" if a.case else ""
    print(f"wrote {write(results_name(topo, a.seeds, workers, 'e2e_rivals') + suffix, result)}")
    return result


if __name__ == "__main__":
    main()
