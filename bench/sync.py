"""What sharing the view costs: bytes per decision, CPU per peer event, snapshots at the full budget.

    .venv/bin/python -m bench.sync           → bench/results/sync.json

- **Bytes on the wire per decision**: the events a replica sends for one decision (its placement,
  its in-flight counts) and for its finish, at routing texts of 2 KB, 8 KB and 32 KB, one decision
  per event-loop turn (the worst case: a burst shares one message) and 16 per turn.
- **CPU**: encoding a decision's event; decoding and applying a peer's event (a placement into the
  tree, followed first by the session book, ``--move-evicted-sessions`` being on by default; and
  without the book) against the local insert the deciding replica does anyway.
- **Snapshots**: a tree filled to ``--max-tree-size`` (the default, 64 Mi characters, per upstream,
  two upstreams) with conversations that share system prompts; the time to walk and compress it
  (what the serving replica spends, in slices between decisions), its size, and the time to load
  it into an empty tree (what a starting replica spends).
"""

from __future__ import annotations

import random
import statistics
import time
from dataclasses import replace

from extproc.config import build
from extproc.director import Director
from extproc.syncwire import Placement, SnapshotReader, compress_records, decode_event, encode_events
from extproc.tree import RadixTree

from .common import per_call, write
from .sim.workloads import words

POOL = ["10.0.0.1:30000", "10.0.0.2:30000"]
RID = "0123456789abcdef"


def director(**overrides: str) -> Director:
    d = Director(build({"upstreams": POOL, **overrides}, env={}), seed=1)
    d.set_upstreams(POOL)
    return d


def interleaved(fns: dict, rounds: int = 7, calls: int = 2000) -> dict:
    """Microseconds per call of each of ``fns``, the median of ``rounds`` batches taken in turn."""
    samples: dict = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            t = time.perf_counter()
            for _ in range(calls):
                fn()
            samples[k].append((time.perf_counter() - t) / calls * 1e6)
    return {k: statistics.median(v) for k, v in samples.items()}


def wire_and_cpu() -> list[dict]:
    rng = random.Random(1)
    rows = []
    counts = {a: 12 for a in POOL}
    for size in (2048, 8192, 32768):
        base = words(rng, size)
        texts = [base[:-64] + words(rng, 64) for _ in range(64)]
        one = [encode_events(RID, 1, 1, counts, [Placement("p" * 32, POOL[0], t)], [], False, 1 << 20)[0] for t in texts]
        batch = encode_events(RID, 1, 1, counts, [Placement("p" * 32, POOL[0], t) for t in texts[:16]], [], False, 1 << 20)
        finish = encode_events(RID, 1, 1, counts, [], [], False, 1 << 20)[0]  # a finish: the counts change
        it = iter(range(1 << 30))
        enc = per_call(lambda: encode_events(RID, 1, next(it), counts, [Placement("p" * 32, POOL[0], texts[0])], [], False, 1 << 20))
        # a peer's event applied to a tree that already holds the shared part (the usual case)
        d = director()
        d._insert("p" * 32, base, POOL[0], 0.0)
        seq = iter(range(1, 1 << 30))
        evs = [decode_event(m, 1 << 20) for m in one]
        dec = per_call(lambda: decode_event(one[0], 1 << 20))
        plain = director(move_evicted_sessions="false")  # no book to follow the placement
        plain._insert("p" * 32, base, POOL[0], 0.0)
        # the 64 placements in turn, with the book and without, in alternating batches (one pass
        # alone moves by half on this machine from run to run)
        def applying(x: Director):
            def one() -> None:
                n = next(seq)
                x.apply(replace(evs[n % 64], seq=n))
            return one

        apply_us = interleaved({True: applying(d), False: applying(plain)})
        d2 = director()
        d2._insert("p" * 32, base, POOL[0], 0.0)
        k = iter(range(1 << 30))
        local = per_call(lambda: d2._insert("p" * 32, texts[next(k) % 64], POOL[1], 0.0))
        row = {"routing_text_chars": size, "bytes_per_decision_one_per_message": sum(map(len, one)) / len(one) + len(finish),
               "bytes_per_decision_16_per_message": sum(map(len, batch)) / 16 + len(finish),
               "encode_us": enc["median_s"] * 1e6, "decode_peer_event_us": dec["median_s"] * 1e6,
               "apply_peer_event_us": apply_us[True], "apply_peer_event_no_book_us": apply_us[False],
               "local_insert_us": local["median_s"] * 1e6}
        print(row, flush=True)
        rows.append(row)
    return rows


def full_tree(budget: int) -> RadixTree:
    """Two upstreams each at ``budget``: sessions of a few turns over 64 system prompts."""
    rng = random.Random(2)
    systems = [words(rng, 6000) for _ in range(64)]
    tree = RadixTree()
    held = dict.fromkeys(POOL, 0)
    i = 0
    while min(held.values()) < budget:
        up = POOL[i % 2]
        text = systems[rng.randrange(64)]
        for _ in range(rng.randrange(1, 6)):
            text += words(rng, rng.randrange(500, 4000))
            tree.insert(str(i % 8), text, up, float(i), limit=budget)
        held[up] = tree.held(up)
        i += 1
    return tree


def records(tree: RadixTree):
    """What :meth:`Director.snapshot_records` yields, ages in ms."""
    for item in tree.branch_ends():
        if item is None:
            yield None
        else:
            partition, text, ends = item
            yield partition, text, [(u, 0) for u in ends]


def snapshot(budget: int) -> dict:
    t = time.perf_counter()
    tree = full_tree(budget)
    fill = time.perf_counter() - t
    t = time.perf_counter()
    chunks = [c for c in compress_records(records(tree), 256 * 1024) if c is not None]
    serve = time.perf_counter() - t
    size = sum(map(len, chunks))
    t = time.perf_counter()
    reader = SnapshotReader(1 << 20, 1 << 24)
    dst = RadixTree()
    lines = 0
    for c in chunks:
        for p, text, tenants in reader.feed(c):
            lines += 1
            for u, _ in tenants:
                dst.insert(p, text, u, 0.0)
    load = time.perf_counter() - t
    # what a starting replica gets: every character (a split where a text ended inside a longer
    # one of the same upstream is not rebuilt: a few nodes fewer, nothing routed differently)
    same = dst.total_chars() == tree.total_chars() and all(
        dst.match(p, text).tenants == tree.match(p, text).tenants for p, text, _ in (r for r in records(tree) if r is not None))
    row = {"budget_chars_per_upstream": budget, "upstreams": len(POOL), "stored_characters": tree.total_chars(), "nodes": tree.node_count(),
           "lines": lines, "snapshot_bytes": size, "chunks": len(chunks), "walk_and_compress_s": serve, "load_s": load,
           "fill_s": fill, "loaded_matches_equal": same, "loaded_nodes": dst.node_count()}
    print(row, flush=True)
    return row


def main() -> dict:
    result = {"benchmark": "sync", "wire_and_cpu": wire_and_cpu(), "snapshots": [snapshot(1 << 22), snapshot(build({}, env={}).max_tree_size)]}
    print(f"wrote {write('sync', result)}")
    return result


if __name__ == "__main__":
    main()
