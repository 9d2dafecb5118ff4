"""Radix-tree speed and memory at scale: match-plus-insert latency by text length, bytes per character.

    .venv/bin/python -m bench.tree                 → bench/results/tree.json (64M characters, ~2 min)
    .venv/bin/python -m bench.tree --chars 8e6     → a quicker run at a smaller scale

The tree is filled the way traffic fills it: 8 upstreams, conversations that each start from one
of 64 shared system prompts (4-8K characters) and grow turn by turn (0.5-2K characters a turn),
every turn's whole text inserted for the conversation's upstream, until the upstreams together hold
``--chars`` characters. Then, for each length, requests that share a stored conversation's prefix
and add new text are matched and inserted, timed one by one.

Targets ([tree]): p99 <= 50 us at 8K characters, linear beyond (<= 1 ms at 1M), and <= 2 bytes of
resident memory per stored character for mostly-ASCII text.
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import time

from extproc.tree import RadixTree

from .common import percentiles, write

WORDS = ("the flight booking passenger reservation policy refund baggage seat upgrade cancel change "
         "agent customer please confirm details account number travel insurance gold silver member").split()


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def corpus(n: int, rng: random.Random) -> str:
    """Pseudo-random English-like text; slices of it serve as prompt pieces."""
    out, size = [], 0
    while size < n:
        w = rng.choice(WORDS)
        out.append(w)
        size += len(w) + 1
    return " ".join(out)


def fill(tree: RadixTree, target_chars: int, rng: random.Random, text: str) -> tuple[list[tuple[str, str]], float]:
    """Insert conversations until the tenants hold ``target_chars``; returns samples of stored texts."""
    tenants = [f"10.0.0.{i}:30000" for i in range(8)]
    systems = [text[o : o + rng.randint(4000, 8000)] for o in (rng.randrange(len(text) - 9000) for _ in range(64))]
    stored: list[tuple[str, str]] = []
    t0 = time.perf_counter()
    held = 0
    now = 0.0
    while held < target_chars:
        tenant = rng.choice(tenants)
        conv = rng.choice(systems)
        for _ in range(rng.randint(2, 12)):
            o = rng.randrange(len(text) - 2100)
            conv = conv + text[o : o + rng.randint(500, 2000)]
            now += 1.0
            tree.insert("model", conv, tenant, now)
        if rng.random() < 0.05:
            stored.append((tenant, conv))
        held = sum(tree.tenant_chars().values()) if rng.random() < 0.1 else held + len(conv)
    return stored, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m bench.tree")
    p.add_argument("--chars", type=float, default=64e6, help="characters held by all upstreams together (default 64e6)")
    p.add_argument("--samples", type=int, default=300)
    p.add_argument("--seed", type=int, default=1)
    a = p.parse_args(argv)
    rng = random.Random(a.seed)
    text = corpus(24_000_000, rng)
    gc.collect()
    before = rss_bytes()
    tree = RadixTree()
    stored, fill_s = fill(tree, int(a.chars), rng, text)
    gc.collect()
    after = rss_bytes()
    stored_chars = tree.total_chars()
    tenant_chars = sum(tree.tenant_chars().values())
    memory = {
        "tenant_characters": tenant_chars,
        "stored_characters": stored_chars,
        "nodes": tree.node_count(),
        "rss_growth_bytes": after - before,
        "bytes_per_stored_character": (after - before) / stored_chars,
        "bytes_per_tenant_character": (after - before) / tenant_chars,
        "fill_seconds": fill_s,
    }
    rows = []
    for length in (1_000, 8_000, 32_000, 256_000, 1_000_000):
        samples = []
        n = a.samples if length <= 32_000 else max(30, a.samples // 10)
        for i in range(n):
            tenant, base = rng.choice(stored)
            # a request sharing a stored prefix (60% of its length when it can), then new text
            shared = base[: min(len(base), int(length * 0.6))]
            o = rng.randrange(len(text) - length)
            query = (shared + text[o : o + length])[:length]
            t = time.perf_counter_ns()
            m = tree.match("model", query)
            tree.insert("model", query, m.deepest[0] if m.deepest else tenant, 1e9 + i)
            samples.append((time.perf_counter_ns() - t) / 1000)
        rows.append({"characters": length, "samples": n, **{k + "_us": v for k, v in percentiles(samples).items()}})
    # one eviction sweep of a tenant by a tenth of what it holds, and its longest slice
    tenant = max(tree.tenant_chars(), key=tree.tenant_chars().get)
    held = tree.tenant_chars()[tenant]
    longest, t_all, slices = 0.0, time.perf_counter(), 0
    gen = tree.evict_steps(tenant, int(held * 0.9))
    while True:
        t = time.perf_counter()
        try:
            next(gen)
        except StopIteration:
            break
        longest = max(longest, time.perf_counter() - t)
        slices += 1
    evict = {"tenant_characters_before": held, "evicted_to": int(held * 0.9), "sweep_seconds": time.perf_counter() - t_all,
             "slices": slices, "longest_slice_ms": longest * 1000}
    result = {"benchmark": "tree", "seed": a.seed, "memory": memory, "match_plus_insert": rows, "eviction": evict,
              "targets": {"p99_us_at_8k": 50, "p99_us_at_1m": 1000, "bytes_per_character": 2.0, "longest_slice_ms": 5}}
    path = write("tree", result)
    print(f"filled {tenant_chars / 1e6:.1f}M tenant characters ({stored_chars / 1e6:.1f}M stored, {memory['nodes']} nodes) in {fill_s:.1f}s")
    print(f"memory: {memory['bytes_per_stored_character']:.2f} bytes per stored character, {memory['bytes_per_tenant_character']:.2f} per tenant character")
    for r in rows:
        print(f"{r['characters']:>9} chars: p50 {r['p50_us']:8.1f} us  p90 {r['p90_us']:8.1f} us  p99 {r['p99_us']:8.1f} us")
    print(f"eviction of 10% of {held / 1e6:.1f}M: {evict['sweep_seconds']:.2f}s in {slices} slices, longest {evict['longest_slice_ms']:.2f} ms")
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
