"""Routing quality of the upper-layer policies, by simulation, on a tuning set and a held-out set.

    .venv/bin/python -m bench.eval            → bench/results/eval.json, bench/results/REPORT.md, PNG plots (~10 min)
    .venv/bin/python -m bench.eval --quick    → one seed, two rates (a couple of minutes; not for the report)
    .venv/bin/python -m bench.eval --report-only   → REPORT.md again from eval.json (and e2e.json, overhead.json)
    .venv/bin/python -m bench.eval --topology 3x3  → eval-3x3.json and its section of REPORT.md (set-ups the defaults were not chosen on)
    .venv/bin/python -m bench.eval --seeds 41,42,43 → eval-4x2-seeds41-42-43.json: both sets on seeds no choice was made on

Topology: 4 SGLang routers x 2 workers (each running up to 32 requests, the costs of an 8B model
on an H200: bench/sim/engine.py), plus the one-layer reference (one sglang-router over all 8
workers). Per workload and seed, worker cache capacity takes three distinct levels (the workload's
unique tokens, a quarter, a sixteenth; never below twice the longest prompt, and a level equal to a
larger one is dropped), and arrival speed x1, x2, x4.

The workloads are split: parameters (``--continuation-knee``, ``--inflight-cost-chars``,
``--inflight-slack``) are chosen on the **tuning** set by ``bench.sweep``; the **held-out** set (real
traces never swept, and a dialogue variant with other statistics) is reported separately, with
other seeds. Its seeds are fresh for each round of tuning: 11–13 were looked at while the
continuation term was designed and 21–23 reported it; the report now runs 31–33, first run after
``--continuation-tail`` was chosen (on the tuning set alone).
Every cell is the mean of three seeds; the spread (min–max) is reported.

Targets, per cell: the default's hit ratio at least the best alternative's minus one point, and
its TTFT p90 at most 1.1x the best upper-layer alternative's (the one-layer reference is not an
upper-layer policy: it is a different topology).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Callable

from extproc.config import DEFAULTS

from .common import RESULTS, parse_seeds, seeds_flag, seeds_suffix, seeds_words, write
from .sim.engine import ServiceModel, Sim, Topology, batch_suffix, parse_topology, prepare, threshold_suffix
from .sim.policies import Single, upper_policies
from .sim.workloads import WORKLOADS

TUNING = ("shared_prefix", "multi_turn", "taubench", "structural_edits", "dialogue")
HELD_OUT = ("sweagent", "loogle", "mooncake", "dialogue_long")
SETS = {"tuning": (TUNING, (1, 2, 3)), "held-out": (HELD_OUT, (31, 32, 33))}
RATES = (1.0, 2.0, 4.0)
LEVELS = (("fits", 1.0), ("quarter", 0.25), ("sixteenth", 1 / 16))
DEFAULT = "prefix-router"
SINGLE = "single-sglang-router"
# what the default must match in hit ratio (one point) ...
HIT_RIVALS = (SINGLE, "prefix-router/creator", "prefix-router/sglang-0.3.2", "prefix-router/least-loaded-hit", "least-loaded",
              "litellm-v1", "consistent-hash", "round-robin")
# ... and in TTFT p90 (1.1x): the upper-layer alternatives
TTFT_RIVALS = ("prefix-router/creator", "prefix-router/sglang-0.3.2", "prefix-router/least-loaded-hit", "least-loaded", "litellm-v1",
               "consistent-hash", "round-robin", "random")
HIT_SLACK, TTFT_FACTOR = 0.01, 1.1
# earlier defaults, each put in the default's place in the summary
ALTERNATES = {"prefix-router/workers-unknown": "The previous default, every router counted as one worker (`--workers-endpoint ''`: its knee 8, not 8 per worker)",
              "prefix-router/unshared-only": "The one before, only texts matching nothing stored count as new prefixes (`--new-prefix-own-chars 0`)",
              "prefix-router/ties-only": "Before it, new prefixes spread over exact ties only (`--new-prefix-weight 0 --new-prefix-knee 0 --new-prefix-own-chars 0`)",
              "prefix-router/no-spread": "Before that, new prefixes not spread (`--new-prefix-window 0`)",
              "prefix-router/no-move": "The default before that, sessions not followed either (`--no-move-evicted-sessions --new-prefix-window 0`)",
              "prefix-router/previous-default": "The one before (only whole prompts continue, `--continuation-tail 0`; sessions not followed)",
              "prefix-router/knee-0": "And before (no continuation term, `--continuation-knee 0`)",
              "prefix-router/slack-3": "An earlier round's tuning winner (`--continuation-knee 0 --inflight-slack 3 --inflight-cost-chars 1536`)",
              "prefix-router/move-evicted": "The default with every response read (`--observe-sample 1`)"}
# set-ups the defaults were not chosen on (`make bench` runs each): the independent evaluation's
# 3 routers x 3 workers, fewer bigger routers, many one-worker routers
OTHER_TOPOLOGIES = ("3x3", "2x4", "8x1")
# ... and two run once, after every choice of the default was made, and never looked at for one:
# more routers of two workers, and the independent evaluation's three routers grown to four workers
UNSEEN_TOPOLOGIES = ("6x2", "3x4")
# ... and with the routers at another --cache-threshold than sglang-router's 0.3, one past a shared
# system prompt's share of a new session's text, so that new sessions are not all sent to its creator
ROUTER_THRESHOLDS = (("4x2", 0.7), ("3x3", 0.7), ("2x4", 0.7))
# ... and with workers that run fewer requests at once than the simulator's 32 (``--batch``): at the
# continuation knee of 8, and under it, where a router's pile on one worker queues (the independent
# evaluation's workers had a batch limit; README, "Workers that run few requests at once")
BATCHES = (("3x3", 8, ()), ("3x3", 4, ()), ("4x2", 8, ()),
           # ... and the lever that helped the routers' piles elsewhere, tried at the smallest batch
           ("3x3", 4, ("--router-cache-threshold", "0.7", "--service-cache-threshold", "0.7")))
# ... and on seeds no choice was made on (``--seeds``), every topology
FRESH_SEEDS = "41,42,43"
# the upper-layer rules put in the default's place on other topologies
IN_PLACE = (DEFAULT, "prefix-router/creator", "prefix-router/least-loaded-hit", "least-loaded", "litellm-v1", "consistent-hash", "round-robin")
HEADLINE = (DEFAULT, "prefix-router/no-move", SINGLE, "prefix-router/creator", "prefix-router/least-loaded-hit", "round-robin", "least-loaded", "consistent-hash",
            "litellm-v1", "true-cache-cost")


def capacities(prepared) -> dict[str, int]:
    """Distinct capacity levels for one prepared workload (see module doc)."""
    unique = len({k for p in prepared for k in p.keys}) * 16
    floor = 2 * max(p.prompt_tokens for p in prepared)
    out: dict[str, int] = {}
    for name, fraction in LEVELS:
        cap = max(floor, int(unique * fraction))
        if cap not in out.values():
            out[name] = cap
    return out


def eval_policies(service_threshold: float | None = None) -> dict[str, object]:
    """Fresh instances of every policy the evaluation compares (new ones for each run: they keep
    state); ``service_threshold``: the service's ``--cache-threshold``, when not its default."""
    return {**upper_policies(service_threshold), SINGLE: Single()}


def unit(args: tuple[str, int, tuple[float, ...], Callable[[], dict[str, object]], Topology]) -> list[dict]:
    """Every capacity, rate and policy for one workload and seed (one process's share)."""
    name, seed, rates, policies, topo = args
    prepared = prepare(WORKLOADS[name](random.Random(seed)))
    model = ServiceModel()
    rows = []
    for cap_name, cap in capacities(prepared).items():
        for rate in rates:
            t = replace(topo, capacity_tokens=cap)
            single = replace(topo, routers=1, workers=topo.routers * topo.workers, capacity_tokens=cap)
            for policy, upper in policies().items():
                s = Sim(prepared, upper, single if policy == SINGLE else t, model, seed=seed, rate_scale=rate).run()
                rows.append({"workload": name, "seed": seed, "capacity": cap_name, "capacity_tokens": cap, "rate": rate, "policy": policy, **s})
    return rows


def simulate(sets: dict[str, tuple[tuple[str, ...], tuple[int, ...]]], rates: tuple[float, ...], jobs: int = 2,
             policies: Callable[[], dict[str, object]] = eval_policies, topo: Topology = Topology()) -> list[dict]:
    units = [(w, s, rates, policies, topo) for workloads, seeds in sets.values() for w in workloads for s in seeds]
    units.sort(key=lambda u: u[0] != "mooncake")  # the longest first
    rows: list[dict] = []
    t0 = time.time()
    with ProcessPoolExecutor(jobs) as ex:
        for (w, s, *_), got in zip(units, ex.map(unit, units)):
            rows.extend(got)
            print(f"{w} seed {s}: {len(got)} runs, {time.time() - t0:.0f}s", flush=True)
    for r in rows:
        r["set"] = next(k for k, (ws, _) in sets.items() if r["workload"] in ws)
    return rows


def cells(rows: list[dict]) -> dict[tuple, dict]:
    """(set, workload, capacity, rate, policy) -> mean and spread over seeds."""
    grouped: dict[tuple, list[dict]] = {}
    for r in rows:
        grouped.setdefault((r["set"], r["workload"], r["capacity"], r["rate"], r["policy"]), []).append(r)
    out = {}
    for key, rs in grouped.items():
        c = {"seeds": len(rs)}
        for m in ("hit_ratio", "ttft_p90_s", "ttft_p50_s", "throughput_rps", "reuse_bound"):
            vals = [r[m] for r in rs]
            c[m], c[m + "_min"], c[m + "_max"] = statistics.mean(vals), min(vals), max(vals)
        out[key] = c
    return out


def verdicts(agg: dict[tuple, dict], policy: str = DEFAULT) -> list[dict]:
    """Per cell: whether ``policy`` meets both targets, against whom."""
    out = []
    for (st, w, cap, rate, p), c in agg.items():
        if p != policy:
            continue
        hit_best = max(((agg[(st, w, cap, rate, r)]["hit_ratio"], r) for r in HIT_RIVALS if (st, w, cap, rate, r) in agg), default=None)
        ttft_best = min(((agg[(st, w, cap, rate, r)]["ttft_p90_s"], r) for r in TTFT_RIVALS if (st, w, cap, rate, r) in agg), default=None)
        if hit_best is None or ttft_best is None:
            continue
        hit_ok = c["hit_ratio"] >= hit_best[0] - HIT_SLACK - 1e-12
        ttft_ok = c["ttft_p90_s"] <= TTFT_FACTOR * ttft_best[0] + 1e-12
        out.append({"set": st, "workload": w, "capacity": cap, "rate": rate, "hit_ratio": c["hit_ratio"], "hit_min": c["hit_ratio_min"],
                    "hit_max": c["hit_ratio_max"], "best_rival_hit": hit_best[0], "best_rival_hit_policy": hit_best[1],
                    "ttft_p90_s": c["ttft_p90_s"], "best_rival_ttft_p90_s": ttft_best[0], "best_rival_ttft_policy": ttft_best[1],
                    "reuse_bound": c["reuse_bound"], "hit_ok": hit_ok, "ttft_ok": ttft_ok})
    return out


def by_cell(result: dict) -> dict[tuple, dict]:
    """A result file's cells keyed as :func:`cells` keys them, for :func:`verdicts`."""
    return {(c["set"], c["workload"], c["capacity"], c["rate"], c["policy"]): c for c in result["cells"]}


def sets_on(seeds: tuple[int, ...] | None) -> dict[str, tuple[tuple[str, ...], tuple[int, ...]]]:
    """The sets, each on ``seeds`` instead of its own when given. Why: the held-out seeds (31–33)
    have reported every change of the default since the continuation tail, and the tuning seeds
    chose them; a default that only holds on those draws of the workloads (which sessions, when
    they arrive, the tie-breaks) is tuned to them. Seeds nothing was chosen on say whether it holds."""
    return {k: (ws, tuple(seeds) if seeds else own) for k, (ws, own) in SETS.items()}


def _given_seeds(result: dict) -> tuple[int, ...] | None:
    """The seeds of a run on other seeds than its benchmark's own (``--seeds``), else ``None``."""
    seeds = result.get("fresh_seeds")
    return tuple(seeds) if seeds else None


def _read(path: Path) -> dict:
    return json.loads(path.read_text())


def run(quick: bool, only: list[str] | None, topo: Topology = Topology(), service_threshold: float | None = None,
        seeds: tuple[int, ...] | None = None) -> dict:
    """``seeds``: every set on these instead of its own (``sets_on``)."""
    sets = {k: (tuple(w for w in ws if not only or w in only), own[:1] if quick else own) for k, (ws, own) in sets_on(seeds).items()}
    rates = (1.0, 4.0) if quick else RATES
    rows = simulate(sets, rates, policies=partial(eval_policies, service_threshold), topo=topo)
    agg = cells(rows)
    return {
        "benchmark": "eval", "sets": {k: {"workloads": list(ws), "seeds": list(s)} for k, (ws, s) in sets.items()},
        "fresh_seeds": list(seeds) if seeds else None,
        "topology": vars(topo), "service_cache_threshold": service_threshold, "service_model": vars(ServiceModel()), "rates": list(rates), "levels": dict(LEVELS),
        "targets": {"hit_slack": HIT_SLACK, "ttft_factor": TTFT_FACTOR, "hit_rivals": list(HIT_RIVALS), "ttft_rivals": list(TTFT_RIVALS)},
        "cells": [{"set": k[0], "workload": k[1], "capacity": k[2], "rate": k[3], "policy": k[4], **v} for k, v in agg.items()],
        "verdicts": verdicts(agg),
    }


# -- the report ------------------------------------------------------------------------------------


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def headline(result: dict) -> list[str]:
    """Per set and workload: the default against the best rival, averaged over capacity x rate."""
    v = result["verdicts"]
    lines = ["| set | workload | cells | both targets | hit ratio, default (seed range) | best rival's hit (who, most often) | reuse bound | TTFT p90 / best upper rival's |",
             "|---|---|---|---|---|---|---|---|"]
    for st in result["sets"]:
        for w in result["sets"][st]["workloads"]:
            mine = [x for x in v if x["set"] == st and x["workload"] == w]
            if not mine:
                continue
            who = statistics.mode(x["best_rival_hit_policy"] for x in mine)
            lines.append(
                f"| {st} | {w} | {len(mine)} | {sum(x['hit_ok'] and x['ttft_ok'] for x in mine)} | "
                f"{_pct(statistics.mean(x['hit_ratio'] for x in mine))} ({_pct(min(x['hit_min'] for x in mine))}–{_pct(max(x['hit_max'] for x in mine))}) | "
                f"{_pct(statistics.mean(x['best_rival_hit'] for x in mine))} ({who}) | {_pct(statistics.mean(x['reuse_bound'] for x in mine))} | "
                f"{statistics.mean(x['ttft_p90_s'] / x['best_rival_ttft_p90_s'] for x in mine):.2f} |")
    return lines


def summary_lines(result: dict) -> list[str]:
    v = result["verdicts"]
    out = []
    agg = by_cell(result)
    alternates = {name: verdicts(agg, name) for name in ALTERNATES if any(c["policy"] == name for c in result["cells"])}
    for st in result["sets"]:
        mine = [x for x in v if x["set"] == st]
        if mine:
            out.append(f"- **{st}**: {sum(x['hit_ok'] and x['ttft_ok'] for x in mine)} of {len(mine)} cells meet both targets "
                       f"(hit: {sum(x['hit_ok'] for x in mine)}, TTFT: {sum(x['ttft_ok'] for x in mine)}); mean hit ratio "
                       f"{_pct(statistics.mean(x['hit_ratio'] for x in mine))} vs best rival {_pct(statistics.mean(x['best_rival_hit'] for x in mine))}, "
                       f"worst cell {min(100 * (x['hit_ratio'] - x['best_rival_hit']) for x in mine):+.1f} points.")
            for name, alt in alternates.items():
                old = [x for x in alt if x["set"] == st]
                if old:
                    out.append(f"  {ALTERNATES[name]} in the default's place: {sum(x['hit_ok'] and x['ttft_ok'] for x in old)} of {len(old)} cells, "
                               f"mean hit ratio {_pct(statistics.mean(x['hit_ratio'] for x in old))}.")
    return out


def report(result: dict) -> str:
    sets = result["sets"]
    lines = [
        "# Routing evaluation (simulated)", "",
        "Made by `python -m bench.eval`; numbers from `bench/results/eval.json`; the defaults were chosen by `python -m bench.sweep` "
        f"on the tuning set only (`bench/results/sweep.json`). Topology: {_topology(result)}, each worker running up to "
        f"{result['topology']['batch']} requests with an 8B model's costs on an H200 (FIELD-NOTES): prefill ~30 µs per uncached token, "
        "one prefill at a time per worker, a decode step flat up to 8 running requests and ~0.87 ms slower per request beyond. "
        f"The one-layer reference is one sglang-router over all {result['topology']['routers'] * result['topology']['workers']} workers. Hit ratio = cached prompt tokens / prompt tokens "
        "(leading cached run). Capacity levels per worker: `fits` = the workload's unique tokens, `quarter`, `sixteenth` "
        "(never below twice the longest prompt; a level equal to a larger one is dropped, so no cell counts twice). "
        f"Rates x{', x'.join(f'{r:g}' for r in result['rates'])} of each workload's own arrival speed.", "",
        "Sets: " + "; ".join(f"**{k}** = {', '.join(v['workloads'])} (seeds {', '.join(map(str, v['seeds']))})" for k, v in sets.items()) + ". "
        "Every cell is the mean of its seeds; ranges are min–max over seeds.", "",
        f"Targets per cell: hit ratio ≥ the best of {{{', '.join(result['targets']['hit_rivals'])}}} minus {100 * result['targets']['hit_slack']:g} "
        f"point, and TTFT p90 ≤ {result['targets']['ttft_factor']:g}x the best of {{{', '.join(result['targets']['ttft_rivals'])}}}.", "",
        "`reuse bound`: the hit ratio if every block any earlier request computed were still cached wherever needed: no policy, "
        "topology or capacity can exceed it. `true-cache-cost` is the cost rule (sessions not followed) fed with the workers' true caches (no real "
        "router has them); it is not a bound.", "",
        "## Summary", "", *summary_lines(result), "",
        "## Per workload (averaged over capacity levels and rates)", "", *headline(result), "",
    ]
    agg = by_cell(result)
    top = max(result["rates"])
    for st, meta in sets.items():
        lines += [f"## {st}: hit ratio % / TTFT p90 s at rate x{top:g}", "", "| workload | capacity | " + " | ".join(HEADLINE) + " |",
                  "|---|---|" + "---|" * len(HEADLINE)]
        for w in meta["workloads"]:
            for cap, _ in LEVELS:
                if (st, w, cap, top, DEFAULT) not in agg:
                    continue
                cells_ = []
                for p in HEADLINE:
                    c = agg.get((st, w, cap, top, p))
                    cells_.append(f"{_pct(c['hit_ratio'])} / {c['ttft_p90_s']:.2f}" if c else "-")
                lines.append(f"| {w} | {cap} | " + " | ".join(cells_) + " |")
        lines.append("")
    missed = [x for x in result["verdicts"] if not (x["hit_ok"] and x["ttft_ok"])]
    lines += ["## Cells where a target is missed", "",
              "| set | workload | capacity | rate | hit % (seeds) | best rival hit % (who) | TTFT p90 s | best upper TTFT p90 s (who) | missed |",
              "|---|---|---|---|---|---|---|---|---|"]
    for x in missed:
        what = ", ".join(n for n, ok in (("hit", x["hit_ok"]), ("TTFT", x["ttft_ok"])) if not ok)
        lines.append(f"| {x['set']} | {x['workload']} | {x['capacity']} | x{x['rate']:g} | {_pct(x['hit_ratio'])} ({_pct(x['hit_min'])}–{_pct(x['hit_max'])}) | "
                     f"{_pct(x['best_rival_hit'])} ({x['best_rival_hit_policy']}) | {x['ttft_p90_s']:.3f} | {x['best_rival_ttft_p90_s']:.3f} ({x['best_rival_ttft_policy']}) | {what} |")
    lines += ["", "Plots: `eval-hit-ratio.png` (hit ratio against capacity, rate x1), `eval-ttft.png` (TTFT p90 against rate, capacity `quarter`), "
              "means over seeds.", ""]
    return "\n".join(lines + _other_topologies() + _measured_sections())


def _threshold(result: dict) -> float | None:
    """The routers' --cache-threshold of a run, when not sglang-router's default."""
    t = result["topology"].get("router_threshold", Topology.router_threshold)
    return None if t == Topology.router_threshold else t


def _setup_words(result: dict) -> tuple[str, str]:
    """A real-stack run's set-up beyond its shape, for a section title, and the flags that reproduce
    it: the routers' threshold ("" twice at sglang-router's default), fake workers running one
    prefill at a time (``--serial-prefill``), or a few requests at once (``--batch``)."""
    t = _threshold(result)
    at, flag = (f", every router at `--cache-threshold {t:g}`", f" --router-cache-threshold {t:g}") if t is not None else ("", "")
    if result.get("serial_prefill"):
        at, flag = f"{at}, workers running one prefill at a time", f"{flag} --serial-prefill"
    if result.get("batch"):
        at, flag = f"{at}, workers running {result['batch']} requests at once", f"{flag} --batch {result['batch']}"
    return at, flag


def _batch(result: dict) -> int | None:
    """The requests each worker of a run runs at once, when not the simulator's default."""
    b = result["topology"].get("batch", Topology.batch)
    return None if b == Topology.batch else b


def _service(result: dict) -> float | None:
    """The service's --cache-threshold of a run (every rule of this project), when not its default."""
    return result.get("service_cache_threshold")


def _topology(result: dict) -> str:
    t, own, seeds, batch = _threshold(result), _service(result), _given_seeds(result), _batch(result)
    return (f"{result['topology']['routers']} SGLang routers x {result['topology']['workers']} workers"
            + (f" running {batch} requests at once each (`--batch {batch}`)" if batch is not None else "")
            + (f", each router at `--cache-threshold {t:g}`" if t is not None else "")
            + (f", the service at `--cache-threshold {own:g}`" if own is not None else "")
            + (f", both sets on fresh seeds {seeds_words(seeds)} (`--seeds`)" if seeds else ""))


def _shape(result: dict) -> str:
    """The short label of a run's set-up in the topologies table (``3x3``, ``3x3, routers' threshold
    0.7``, ``3x3, routers' threshold 0.7, the service's 0.7``, ``3x3, batch 4``)."""
    t, own, seeds, batch = _threshold(result), _service(result), _given_seeds(result), _batch(result)
    return (_rxw(result) + (f", batch {batch}" if batch is not None else "") + (f", routers' threshold {t:g}" if t is not None else "")
            + (f", the service's {own:g}" if own is not None else "") + (f", seeds {seeds_words(seeds)}" if seeds else ""))


def _rxw(result: dict) -> str:
    """A run's routers x workers as the flags write it (``3x3``)."""
    return f"{result['topology']['routers']}x{result['topology']['workers']}"


def topology_name(topo: Topology, service_threshold: float | None = None, seeds: tuple[int, ...] | None = None) -> str:
    """The results file of an evaluation on a set-up other than the default's (``eval-3x3``,
    ``eval-3x3-threshold0.7`` with the routers at another --cache-threshold,
    ``eval-3x3-threshold0.7-service0.7`` with the service at another one too,
    ``eval-4x2-seeds41-42-43`` on other seeds, ``eval-3x3-batch4`` with workers running another
    number of requests at once)."""
    own = "" if service_threshold is None else f"-service{service_threshold:g}"
    return f"eval-{topo.routers}x{topo.workers}{batch_suffix(topo)}{threshold_suffix(topo)}{own}{seeds_suffix(seeds)}"


def _runs_on_record(benchmark: str) -> list[Path]:
    """A benchmark's results files on other set-ups (``eval-3x3.json``): each topology, then its
    runs on other seeds and with the routers at another threshold; runs of some cases only
    (``-subset``) left out."""
    paths = [p for p in RESULTS.glob(f"{benchmark}-*x*.json") if not p.stem.endswith("-subset")]
    return sorted(paths, key=lambda p: (re.split("-threshold|-seeds|-batch", p.stem)[0], p.stem))


def _other_topologies() -> list[str]:
    """The summary of every ``--topology`` run on record: the same sets, seeds and targets on
    set-ups the defaults were not chosen on, and how each upper-layer rule would fare there in the
    default's place (a rule that is only best on the topology it was tuned on is not a default)."""
    runs = [_read(path) for path in _runs_on_record("eval")]
    if not runs:
        return []
    main = RESULTS / "eval.json"
    runs = ([_read(main)] if main.exists() else []) + runs
    lines = ["## Other topologies (`python -m bench.eval --topology RxW`)", "",
             "The same workloads, seeds, capacity levels, rates and targets on set-ups the defaults were not chosen on "
             "(a row naming seeds: both sets on a fresh draw of them, `--seeds`, which no choice was made on). "
             "Each upper-layer rule in the default's place: cells meeting both targets, of all cells of both sets (mean hit ratio %).", "",
             "| topology | " + " | ".join(IN_PLACE) + " |", "|---|" + "---|" * len(IN_PLACE)]
    for d in runs:
        agg = by_cell(d)
        row = []
        for name in IN_PLACE:
            v = verdicts(agg, name)
            row.append(f"{sum(x['hit_ok'] and x['ttft_ok'] for x in v)} of {len(v)} ({_pct(statistics.mean(x['hit_ratio'] for x in v))})" if v else "-")
        chosen = " (the defaults chosen here)" if d is runs[0] and main.exists() else ""
        lines.append(f"| {_shape(d)}{chosen} | " + " | ".join(row) + " |")
    lines.append("")
    for d in runs[1:] if main.exists() else runs:
        lines += [f"**{_topology(d)}** (one-layer reference over all {d['topology']['routers'] * d['topology']['workers']} workers):", "",
                  *summary_lines(d), ""]
        missed = [x for x in d["verdicts"] if not (x["hit_ok"] and x["ttft_ok"])]
        if missed:
            lines += ["Missed: " + "; ".join(
                f"{x['workload']} {x['capacity']} x{x['rate']:g} ("
                + ", ".join(f"{n} {a}" for n, ok, a in (("hit", x["hit_ok"], f"{100 * (x['hit_ratio'] - x['best_rival_hit']):+.1f} vs {x['best_rival_hit_policy']}"),
                                                      ("TTFT", x["ttft_ok"], f"{x['ttft_p90_s'] / x['best_rival_ttft_p90_s']:.2f}x {x['best_rival_ttft_policy']}")) if not ok)
                + ")" for x in missed) + ".", ""]
    return lines


def _e2e_lines(d: dict, title: str) -> list[str]:
    """One ``bench.e2e`` run: the simulator against the stack, and the stack against its real rivals."""
    cache = {r["workload"]: r.get("capacity_tokens") for r in d["rows"]}
    lines = [title, "",
             d.get("description", "").replace("cache per workload below", "cache per worker in the table"), "",
             "| workload | cache per worker (tokens) | concurrency | simulated | stack | difference (points) | within tolerance |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['workload']} | {cache.get(r['workload'])} | {r.get('concurrency', 1)} | {r['simulated_mean']:.3f} | {r['stack_mean']:.3f} | "
              f"{r['difference_points']:+.1f} | {'yes' if abs(r['difference_points']) <= d.get('tolerance_points', 1e9) else 'NO'} |" for r in d["summary"]]
    lines.append("")
    if d["summary"] and "rivals" in d["summary"][0]:
        names = list(d["summary"][0]["rivals"])
        opt_ins = list(d["summary"][0].get("opt_ins", {}))  # the service's other settings (bench.e2e OPT_INS): shown, never a target
        again = ["prefix-router again, beside the other settings"] if "again" in d["summary"][0] else []  # their own run's default

        def figures(r: dict, n: str) -> str:
            x = r["rivals"][n] if n in names else r["again"] if n in again else r["opt_ins"][n]
            read = f", {100 * x['responses_read_share']:.1f} % read" if "responses_read_share" in x else ""
            return f"{x['hit_ratio']:.3f} / {1000 * x['latency_p90_s']:.0f}{read}"

        def own(r: dict) -> str:  # the default's, with what it read when the run recorded it
            read = f", {100 * r['stack_responses_read_share']:.1f} % read" if "stack_responses_read_share" in r else ""
            return f"{r['stack_mean']:.3f} / {1000 * r['stack_latency_p90_s']:.0f}{read}"

        lines += ["The same sessions through rivals made of real processes: hit ratio / request latency p90 in ms (mean of the seeds)."
                  + (" Last, the service's other settings through the same stack (`--opt-ins-only` adds them to a run on record, with "
                     "the default measured again beside them), with the share of requests whose response the service read: "
                     "not rivals, so not in the targets." if opt_ins else "")
                  + (" The default measured again is the service's default as of that later run, which may not be the run on "
                     "record's (README, Choosing the defaults, says which records predate a change of the default)."
                     if again else ""), "",
                  "| workload | concurrency | prefix-router | " + " | ".join([*names, *again, *(f"setting: {o}" for o in opt_ins)]) + " |",
                  "|---|---|---|" + "---|" * (len(names) + len(again) + len(opt_ins))]
        lines += [f"| {r['workload']} | {r['concurrency']} | {own(r)} | "
                  + " | ".join(figures(r, n) for n in (*names, *again, *opt_ins)) + " |"
                  for r in d["summary"]]
        lines.append("")
        if "targets_met" in d["summary"][0]:
            lines += [f"Targets per case: hit ratio at least the best rival's minus {d['hit_slack_points']:g} point, latency p90 at most "
                      f"{d['latency_factor']:g}x the best upper-layer rival's (every rival but one-layer).", "",
                      "| workload | concurrency | hit: prefix-router / best rival (who) | latency p90: prefix-router / best upper-layer (who) | both met |",
                      "|---|---|---|---|---|"]
            lines += [f"| {r['workload']} | {r['concurrency']} | {r['stack_mean']:.3f} / {r['best_hit']:.3f} ({r['best_hit_rival']}) | "
                      f"{1000 * r['stack_latency_p90_s']:.0f} / {1000 * r['best_latency_p90_s']:.0f} ms ({r['best_latency_rival']}) | "
                      f"{'yes' if r['targets_met'] else 'NO'} |" for r in d["summary"]]
            lines.append("")
    return lines


def _e2e_rivals_lines(d: dict) -> list[str]:
    """One ``bench.e2e_rivals`` run: each real rival simulated in lockstep and with the stack's
    overhead, beside what the real stack measured."""
    shape, (at, flag) = _rxw(d), _setup_words(d)
    seeds = _given_seeds(d)
    if seeds:
        at, flag = f"{at}, seeds {seeds_words(seeds)}", f"{flag} --seeds {seeds_flag(seeds)}"
    names = list(d["cases"][0]["policies"]) if d["cases"] else []
    threshold = d["topology"].get("router_threshold", Topology.router_threshold)
    lines = [f"### The real rivals simulated on {shape}{at} (`python -m bench.e2e_rivals --topology {shape} --clients {','.join(map(str, d['clients']))}{flag}`)", "",
             d["description"], "", "Hit ratio: simulated in lockstep / with the overhead / through the real stack. Last column: the match rate "
             "of prefix-router's decisions for requests not continuing a conversation (what `prefix_router_new_session_match_rate` "
             f"observes), with the overhead: median, and the share over the routers' {threshold:g}.", "",
             "| workload | concurrency | " + " | ".join(names) + " | new sessions' match rate |", "|---|---|" + "---|" * (len(names) + 1)]
    def cell(r: dict) -> str:
        return f"{r['lockstep']:.3f} / {r['overhead']:.3f} / " + ("–" if r["stack"] is None else f"{r['stack']:.3f}")

    def rates(n: dict | None) -> str:
        return "–" if not n else f"{n['median']:.2f}, {100 * n['over_router_threshold']:.0f} % over"

    lines += [f"| {c['workload']} | {c['concurrency']} | " + " | ".join(cell(c["policies"][n]) for n in names) + f" | {rates(c.get('new_sessions'))} |"
              for c in d["cases"]]
    if d["cases"] and "overhead_latency_p90_s" in d["cases"][0]["policies"][names[0]]:
        lines += ["", *_e2e_rivals_latency(d["cases"], names)]
    if d["cases"] and "paired" in d["cases"][0]:
        lines += ["", *_e2e_rivals_paired(d["cases"])]
    return lines + [""]


def _e2e_rivals_paired(cases: list[dict]) -> list[str]:
    """Each rival against prefix-router seed by seed, with the overhead: whether a difference is
    the rule's or the draw's (a mean difference within about two standard errors of 0 is a draw)."""
    rivals = list(cases[0]["paired"])
    n = cases[0]["paired"][rivals[0]]["seeds"] if rivals else 0

    def cell(x: dict) -> str:
        se = "" if x["standard_error_points"] is None else f" ± {x['standard_error_points']:.2f}"
        return f"{x['mean_points']:+.2f}{se} ({x['ahead']}/{x['behind']})"

    return [f"Paired by seed, with the overhead ({n} seeds): each rival's hit ratio minus prefix-router's, in points, mean ± its "
            "standard error (seeds where the rival is ahead / behind). Positive: the rival is ahead.", "",
            "| workload | concurrency | " + " | ".join(rivals) + " |", "|---|---|" + "---|" * len(rivals),
            *(f"| {c['workload']} | {c['concurrency']} | " + " | ".join(cell(c["paired"][r]) for r in rivals) + " |" for c in cases)]


def _e2e_rivals_latency(cases: list[dict], names: list[str]) -> list[str]:
    """Request latency p90 of the same runs: is a latency miss through the stack the rule's (its
    loads) or the machine's? The simulator times only the workers' model, so its figures sit below
    the stack's (which adds its own overhead to every request): compare within a column."""
    from .e2e import UPPER_LAYER  # bench.e2e's rivals of the upper layer (not one-layer); here only when reporting

    upper = [n for n in names if n in UPPER_LAYER]

    def cell(r: dict) -> str:
        stack = "–" if r.get("stack_latency_p90_s") is None else f"{1000 * r['stack_latency_p90_s']:.0f}"
        return f"{1000 * r['lockstep_latency_p90_s']:.0f} / {1000 * r['overhead_latency_p90_s']:.0f} / {stack}"

    def ratio(c: dict) -> str:
        mine = c["policies"]["prefix-router"]["overhead_latency_p90_s"]
        best = min(upper, key=lambda n: c["policies"][n]["overhead_latency_p90_s"])
        return f"{mine / c['policies'][best]['overhead_latency_p90_s']:.2f} ({best})"

    return ["Request latency p90 in ms: simulated in lockstep / with the overhead / through the real stack (the simulator times "
            "the workers' model alone, the stack adds its own overhead to every request: compare within a column). Last column: "
            "prefix-router's simulated p90 with the overhead over the best upper-layer rival's (the target: at most 1.1).", "",
            "| workload | concurrency | " + " | ".join(names) + " | prefix-router / best upper-layer |", "|---|---|" + "---|" * (len(names) + 1),
            *(f"| {c['workload']} | {c['concurrency']} | " + " | ".join(cell(c["policies"][n]) for n in names) + f" | {ratio(c)} |" for c in cases)]


def _failed_open(row: dict) -> str:
    """A row's share of requests Envoy sent to the fallback route (bench.overhead), or a dash for a
    path without ext_proc or a run from before it was counted."""
    share = row.get("fallback_share")
    return "–" if share is None else f"{100 * share:.2f} %"


def _measured_sections() -> list[str]:
    """The end-to-end check and the overhead through Envoy, from their own runs' JSON when present."""
    lines: list[str] = []
    e2e = RESULTS / "e2e.json"
    if e2e.exists():
        lines += _e2e_lines(_read(e2e), "## The simulator against the real stack (`python -m bench.e2e`)")
    for path in _runs_on_record("e2e"):
        d = _read(path)
        shape, (at, flag) = _rxw(d), _setup_words(d)
        clients = ",".join(str(c) for c in dict.fromkeys(r["concurrency"] for r in d["summary"]))
        seeds = _given_seeds(d)
        on, again = (f", on fresh seeds {seeds_words(seeds)}", f" --seeds {seeds_flag(seeds)}") if seeds else ("", "")
        lines += _e2e_lines(d, f"### The same on {shape}{at}{on} (`python -m bench.e2e --topology {shape} --clients {clients}{flag}{again}`)")
    for path in _runs_on_record("e2e_rivals"):
        lines += _e2e_rivals_lines(_read(path))
    observed = RESULTS / "observed.json"
    if observed.exists():
        d = _read(observed)
        policies = list(d["summary"][0]["hit_ratio"])
        lines += ["## Observed cache hits fed back, simulated (`python -m bench.observed`)", "",
                  f"Hit ratio, mean over seeds, capacity levels {', '.join(d['levels'])} and rates {', '.join(f'x{r:g}' for r in d['rates'])}; "
                  "the gap is what the default loses to the same rule fed the workers' true caches.", "",
                  "| set | workload | " + " | ".join(policies) + " | gap (points) |", "|---|---|" + "---|" * (len(policies) + 1)]
        lines += [f"| {r['set']} | {r['workload']} | " + " | ".join(f"{r['hit_ratio'][q]:.3f}" for q in policies) + f" | {r['gap_points']:.1f} |"
                  for r in d["summary"]]
        lines.append("")
    overhead = RESULTS / "overhead.json"
    if overhead.exists():
        d = _read(overhead)
        lines += ["## Overhead through Envoy (`python -m bench.overhead`)", "",
                  "wrk, one thread, 10 s per cell, 2 KB chat bodies, upstreams answering at once. Targets: added p50 <= "
                  f"{d['targets']['added_p50_ms_max']} ms, throughput >= {d['targets']['throughput_vs_direct_min']:.0%} of Envoy-direct.", "",
                  "| path | connections | req/s | p50 ms | p99 ms | added p50 ms | throughput vs direct | failed open |", "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['path']} | {r['connections']} | {r['rps']:.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['added_p50_ms']:+.2f} | "
                  f"{r['throughput_vs_direct']:.0%} | {_failed_open(r)} |" for r in d["rows"]]
        lines.append("")
        above = d.get("duplex_above_grpc_floor_p50_ms")
        if above:
            lines += ["The service in duplex mode above the gRPC floor (Envoy with a server answering the service's answer, made "
                      "beforehand), p50: " + ", ".join(f"{v:+.2f} ms at {c} connection{'s' if c != '1' else ''}" for c, v in above.items()) + ".", ""]
        st = d.get("streamed")
        if st:
            lines += [f"Streamed responses ({st['tokens_per_response']} events each, {st['token_delay_s'] * 1000:g} ms apart, from fake workers): "
                      "each mode with and without reading every response.", "",
                      "| path | connections | req/s | p50 ms | p99 ms | ext_proc messages per request | added p50 ms | throughput vs unread | failed open |",
                      "|---|---|---|---|---|---|---|---|---|"]
            lines += [f"| {r['path']} | {r['connections']} | {r['rps']:.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['ext_proc_messages_per_request']:.1f} | "
                      f"{r['added_p50_ms']:+.2f} | {r['throughput_vs_unsampled']:.0%} | {_failed_open(r)} |" for r in st["rows"]]
            lines.append("")
    return lines


def plots(result: dict) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells_ = result["cells"]
    workloads = [w for s in result["sets"].values() for w in s["workloads"]]
    out = []
    caps = [c for c, _ in LEVELS]
    for metric, x, fixed, fname, ylabel in (
        ("hit_ratio", "capacity", {"rate": result["rates"][0]}, "eval-hit-ratio.png", "hit ratio"),
        ("ttft_p90_s", "rate", {"capacity": "quarter"}, "eval-ttft.png", "TTFT p90 (s)"),
    ):
        cols = 3
        rows_n = (len(workloads) + cols - 1) // cols
        fig, axes = plt.subplots(rows_n, cols, figsize=(4.5 * cols, 3.2 * rows_n), squeeze=False)
        for ax, w in zip(axes.flat, workloads):
            for p in HEADLINE:
                pts = [(c[x], c[metric]) for c in cells_ if c["workload"] == w and c["policy"] == p and all(c[k] == v for k, v in fixed.items())]
                if x == "capacity":
                    pts = sorted(pts, key=lambda t: caps.index(t[0]))
                else:
                    pts = sorted(pts)
                if pts:
                    ax.plot([str(a) if x == "capacity" else a for a, _ in pts], [b for _, b in pts], marker="o", label=p,
                            linewidth=2.5 if p == DEFAULT else 1)
            ax.set_title(w)
            ax.set_xlabel("capacity level" if x == "capacity" else "arrival speed (x)")
            ax.set_ylabel(ylabel)
        for ax in list(axes.flat)[len(workloads):]:
            ax.axis("off")
        axes.flat[0].legend(fontsize=6)
        fig.tight_layout()
        path = RESULTS / fname
        fig.savefig(path, dpi=80)
        plt.close(fig)
        out.append(path)
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m bench.eval")
    p.add_argument("--quick", action="store_true", help="one seed, two rates (not for the report)")
    p.add_argument("--workload", action="append", help="only these workloads (repeatable)")
    p.add_argument("--report-only", action="store_true", help="rewrite REPORT.md from the last eval.json (e.g. after bench.e2e)")
    p.add_argument("--topology", default=Topology(), type=parse_topology, metavar="RxW",
                   help="routers x workers per router; other than the default's, results go to eval-RxW.json and a section of REPORT.md")
    p.add_argument("--router-cache-threshold", type=float, default=Topology.router_threshold, metavar="X",
                   help="each simulated sglang-router's --cache-threshold (its default 0.3); other than that, results go to eval-RxW-thresholdX.json")
    p.add_argument("--service-cache-threshold", type=float, metavar="X",
                   help="the service's --cache-threshold, for every rule of this project (its default "
                        f"{DEFAULTS.cache_threshold:g}); results go to eval-RxW[-thresholdX]-serviceX.json")
    p.add_argument("--seeds", type=parse_seeds, metavar="N,N,...",
                   help="both sets on these seeds instead of their own (tuning 1-3, held-out 31-33): seeds no choice was made on; "
                        "results go to eval-RxW[...]-seedsN-N.json")
    p.add_argument("--batch", type=int, default=Topology.batch, metavar="N",
                   help=f"requests each simulated worker runs at once, the rest queued (default {Topology.batch}); other than that, results "
                        "go to eval-RxW-batchN.json")
    a = p.parse_args(argv)
    if a.batch < 1:
        p.error("--batch must be at least 1")
    topo = replace(a.topology, router_threshold=a.router_cache_threshold, batch=a.batch)
    own, seeds = a.service_cache_threshold, a.seeds
    if a.report_only:
        result = _read(RESULTS / "eval.json")
        (RESULTS / "REPORT.md").write_text(report(result))
        print(f"wrote {RESULTS / 'REPORT.md'}")
        return result
    result = run(a.quick, a.workload, topo, own, seeds)
    if topo != Topology() or own is not None or seeds:
        name = topology_name(topo, own, seeds)
        write(name, result)
        (RESULTS / "REPORT.md").write_text(report(_read(RESULTS / "eval.json")))
        print(f"wrote {RESULTS / name}.json and its section of {RESULTS / 'REPORT.md'}")
        print("\n".join(summary_lines(result)))
        return result
    write("eval", result)
    (RESULTS / "REPORT.md").write_text(report(result))
    plots(result)
    print(f"wrote {RESULTS / 'eval.json'}, {RESULTS / 'REPORT.md'} and plots")
    print("\n".join(summary_lines(result)))
    return result


if __name__ == "__main__":
    main()
