"""Several replicas of the service, synced or independent, by simulation.

    .venv/bin/python -m bench.replicas           → bench/results/replicas.json (and a README table)
    .venv/bin/python -m bench.replicas --quick   → one seed, fewer workloads (under a minute)

Envoy spreads ext_proc streams over the replicas: here request i goes to replica i mod N (round
robin), so a conversation's turns are decided by different replicas. Each replica runs the
project's own policy code over its own tree and its own in-flight counts, knowing each router's
workers as the service reads them (``--workers-endpoint``):

- ``synced`` (``--sync-url``): a replica's placements and in-flight changes reach its peers
  ``delay`` seconds later (0, 1, 10, 100 ms), as the sync link delivers them; each replica's load
  is its own count plus what it has heard of its peers';
- ``independent``: no sync, each replica sees only its own placements and its own requests.

These run the cost rule alone (``--no-move-evicted-sessions``). The default follows sessions as
well (``--move-evicted-sessions``), each replica with its own book, read responses as
``SessionBook.worth_reading`` picks them (duplex mode): ``sessions shared`` synced 1 ms, each book
following its peers' placements and hearing their moves and reports as the sync link carries them
(``sessions.learn_placement``, ``sessions.apply_note``), against ``sessions not shared`` (synced 1
ms, each book following only the turns its replica decides: the service before it shared them).

N = 1 is the single replica each is compared with (with a book for the rows that have one). Topology, service model and capacity as in
``bench.eval`` (4 routers x 2 workers, capacity ``quarter``), at twice each workload's own arrival
speed, so that load matters; three seeds, mean and spread (min..max) reported.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections import Counter, deque
from typing import Callable

from extproc.config import DEFAULTS
from extproc.feedback import FeedbackRule, is_stale, observed_chars
from extproc.newprefixes import NewPrefixes
from extproc.policy import decide
from extproc.sessions import SessionBook, apply_note, decide_following, learn_placement, reference, report
from extproc.tree import RadixTree

from .common import write
from .eval import capacities
from .sim.engine import ServiceModel, Sim, Topology, prepare
from .sim.policies import router_workers
from .sim.workloads import WORKLOADS

SEEDS = (7, 8, 9)
REPLICAS = (1, 2, 4, 8)
DELAYS_MS = (0, 1, 10, 100)
RATE = 2.0
SHARED, NOT_SHARED = "synced 1 ms, sessions shared", "synced 1 ms, sessions not shared"


class Replicas:
    """N replicas of prefix-router's policy, round robin, synced after ``delay`` or not at all;
    ``books``: each follows sessions (the default), ``share`` them with its peers or not."""

    def __init__(self, n: int, delay: float | None, books: bool = False, share: bool = True) -> None:
        self.n, self.delay = n, delay  # delay None: independent
        self.cfg = DEFAULTS.policy()
        self.trees = [RadixTree() for _ in range(n)]
        self.spread = [NewPrefixes(self.cfg.new_prefix_window) for _ in range(n)]  # each replica's count, peers' placements too
        self.books = [SessionBook(self.cfg.cache_threshold, DEFAULTS.move_family_turns) for _ in range(n)] if books else None
        self.share = share
        self.reading: dict[int, tuple] = {}  # responses read for a book: (session, turn, predicted, length, ref)
        self.rule = FeedbackRule()
        self.moves = self.reads = self.notes_unknown = 0
        self.own: list[Counter] = [Counter() for _ in range(n)]
        self.heard: list[Counter] = [Counter() for _ in range(n)]  # peers' counts as heard by each replica
        self.pending: deque = deque()  # (due, source, kind, payload) in the order sent
        self.owner: dict[int, int] = {}
        self.next = 0
        self.last_reason = ""

    def _deliver(self, now: float) -> None:
        while self.pending and self.pending[0][0] <= now:
            _, src, kind, payload = self.pending.popleft()
            for dst in range(self.n):
                if dst == src:
                    continue
                if kind == "count":
                    router, delta = payload
                    self.heard[dst][router] += delta
                elif kind == "note":
                    if self.books is not None and self.share:
                        self.notes_unknown += not apply_note(self.books[dst], *payload)
                else:
                    partition, text, router = payload
                    book = self.books[dst] if self.books is not None and self.share else None
                    learn_placement(book, self.spread[dst], self.trees[dst], partition, text, router, self.cfg)
                    self.trees[dst].insert(partition, text, router, now)

    def _send(self, now: float, src: int, kind: str, payload) -> None:
        if self.delay is not None and self.n > 1:
            self.pending.append((now + self.delay, src, kind, payload))

    def choose(self, p, sim) -> int:
        self._deliver(sim.now)
        i = self.next
        self.next = (self.next + 1) % self.n
        routers = [str(r) for r in range(len(sim.routers))]
        loads = {r: self.own[i][r] + self.heard[i][r] for r in routers}
        note = None
        if self.books is None:
            d = decide(self.trees[i], loads, p.partition, p.sglang_text, sim.now, self.cfg, sim.rng, lately=self.spread[i].counts,
                       workers=router_workers(sim))
        else:
            d, note = self._following(i, p, loads, sim)
        self.spread[i].took(d.upstream, d.new_prefix)
        self.last_reason = d.reason
        self.own[i][d.upstream] += 1
        self.owner[id(p)] = i
        self._send(sim.now, i, "count", (d.upstream, 1))
        if p.sglang_text:
            self._send(sim.now, i, "place", (p.partition, p.sglang_text, d.upstream))
        if note is not None:  # after the placement it names, as the sync link sends them
            self._send(sim.now, i, "note", note)
        return int(d.upstream)

    def _following(self, i: int, p, loads: dict[str, int], sim) -> tuple:
        """The default's decision at replica ``i`` (its book), the read its response gets, and the
        note of a move for the peers."""
        book, text = self.books[i], p.sglang_text
        d, s, moved = decide_following(book, self.trees[i], loads, p.partition, text, self.cfg, sim.rng, self.spread[i].counts, router_workers(sim))
        if text:
            self.trees[i].insert(p.partition, text, d.upstream, sim.now)
        if s is None:
            return d, None
        ref = reference(p.partition, text, s)
        if book.worth_reading(s, d.text_len):
            self.reads += 1
            self.reading[id(p)] = (s, s.turns, d.matched, d.text_len, ref)
        self.moves += moved
        return d, (ref, "moved") if moved else None

    def finished(self, p, r: int, sim) -> None:
        self._deliver(sim.now)
        rec = self.reading.pop(id(p), None)
        if rec is not None:
            s, turn, predicted, length, ref = rec
            evicted = is_stale(predicted, observed_chars(sim.last_hit, p.prompt_tokens, length), self.rule)
            if report(s, turn, evicted):
                self._send(sim.now, self.owner[id(p)], "note", (ref, "evicted" if evicted else "cached"))
        i = self.owner.pop(id(p))
        self.own[i][str(r)] -= 1
        self._send(sim.now, i, "count", (str(r), -1))


def run(quick: bool) -> dict:
    seeds = SEEDS[:1] if quick else SEEDS
    names = ["multi_turn", "shared_prefix", "taubench"] if quick else list(WORKLOADS)
    variants = [(1, "single", None, False, True)] + [(n, f"synced {d} ms", d / 1000, False, True) for n in REPLICAS[1:] for d in DELAYS_MS] + \
               [(n, "independent", None, False, True) for n in REPLICAS[1:]] + [(1, "single, sessions followed", None, True, True)] + \
               [(n, v, 0.001, True, v == SHARED) for n in REPLICAS[1:] for v in (SHARED, NOT_SHARED)]
    rows = []
    for name in names:
        t0 = time.time()
        for seed in seeds:
            prepared = prepare(WORKLOADS[name](random.Random(seed)))
            cap = capacities(prepared)["quarter"]
            topo = Topology(capacity_tokens=cap)
            for n, label, delay, books, share in variants:
                upper = Replicas(n, delay if label != "independent" else None, books, share)
                r = Sim(prepared, upper, topo, ServiceModel(), seed=seed, rate_scale=RATE).run()
                rows.append({"workload": name, "seed": seed, "replicas": n, "variant": label, "books": books,
                             "hit_ratio": r["hit_ratio"], "ttft_p90_s": r["ttft_p90_s"], "requests": r["requests"],
                             "moves": upper.moves, "reads": upper.reads, "notes_unknown": upper.notes_unknown})
        print(f"{name}: {time.time() - t0:.1f}s", flush=True)
    return {"benchmark": "replicas", "seeds": list(seeds), "rate": RATE, "capacity": "quarter", "rows": rows, "summary": summarize(rows)}


def summarize(rows: list[dict]) -> list[dict]:
    """Per workload, replicas and variant: mean and range over seeds, and the loss against one
    replica in hit-ratio points (per seed, then averaged)."""
    out = []
    keys = dict.fromkeys((r["workload"], r["replicas"], r["variant"]) for r in rows)
    for w, n, v in keys:
        mine = [r for r in rows if (r["workload"], r["replicas"], r["variant"]) == (w, n, v)]
        books = mine[0].get("books", False)
        base = {r["seed"]: r for r in rows if r["workload"] == w and r["replicas"] == 1 and r.get("books", False) == books}
        loss = [100 * (base[r["seed"]]["hit_ratio"] - r["hit_ratio"]) for r in mine]
        hits = [r["hit_ratio"] for r in mine]
        ttft = [r["ttft_p90_s"] for r in mine]
        out.append({"workload": w, "replicas": n, "variant": v, "hit_ratio_mean": statistics.mean(hits),
                    "hit_ratio_min": min(hits), "hit_ratio_max": max(hits), "loss_points_mean": statistics.mean(loss),
                    "loss_points_max": max(loss), "ttft_p90_mean_s": statistics.mean(ttft),
                    "moves_mean": statistics.mean(r.get("moves", 0) for r in mine)})
    return out


def _loss_table(result: dict, single: str, variants: tuple[str, ...], label: Callable[[str], str], extra: tuple[str, str, str]) -> str:
    """A README table: per workload, one replica (``single``) and, for each replica count and
    variant, the loss in hit-ratio points against it (mean over seeds, worst seed), with one more
    figure (``extra``: heading, summary key, format)."""
    s = result["summary"]
    row = {(r["workload"], r["replicas"], r["variant"]): r for r in s}
    heading, key, fmt = extra
    cols = [(n, v) for n in REPLICAS[1:] for v in variants]
    lines = [f"| workload | 1 replica: hit / {heading} | " + " | ".join(f"{n} {label(v)}" for n, v in cols) + " |",
             "|---|---|" + "---|" * len(cols)]
    for w in dict.fromkeys(r["workload"] for r in s):
        one = row.get((w, 1, single))
        if one is None:
            continue
        cells = [f"{-r['loss_points_mean']:+.1f} (worst {-r['loss_points_max']:+.1f}) / {r[key]:{fmt}}" for r in (row[(w, n, v)] for n, v in cols)]
        lines.append(f"| {w} | {one['hit_ratio_mean']:.3f} / {one[key]:{fmt}} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def table(result: dict) -> str:
    """README table: the cost rule alone, synced 10 ms and independent: loss in hit-ratio points
    against one replica, and TTFT p90."""
    return _loss_table(result, "single", ("synced 10 ms", "independent"), str, ("TTFT p90 s", "ttft_p90_mean_s", ".2f"))


def sessions_table(result: dict) -> str:
    """README table: the default (sessions followed) with replicas synced 1 ms, its sessions shared
    or not: loss in hit-ratio points against one replica with its book, and sessions moved per run."""
    return _loss_table(result, "single, sessions followed", (SHARED, NOT_SHARED), lambda v: v.split(", ")[1], ("moves", "moves_mean", ".1f"))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m bench.replicas")
    p.add_argument("--quick", action="store_true")
    a = p.parse_args(argv)
    result = run(a.quick)
    worst = {}
    for r in result["summary"]:
        if r["variant"].startswith("synced") and int(r["variant"].split()[1]) <= 10:
            worst[r["workload"]] = max(worst.get(r["workload"], -1e9), r["loss_points_max"])
    result["worst_synced_loss_up_to_10ms_points"] = worst
    print(table(result))
    print(sessions_table(result))
    print(f"wrote {write('replicas', result)}")
    return result


if __name__ == "__main__":
    main()
