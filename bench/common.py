"""Shared helpers of the benchmarks: timing, results files, machine facts."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    return {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count()}


def per_call(fn: Callable[[], object], min_time: float = 0.2, repeats: int = 5) -> dict:
    """Median and best seconds per call over ``repeats`` batches of at least ``min_time`` each."""
    n = 1
    while True:
        t = time.perf_counter()
        for _ in range(n):
            fn()
        if time.perf_counter() - t >= min_time / 4:
            break
        n *= 4
    samples = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        samples.append((time.perf_counter() - t) / n)
    return {"median_s": statistics.median(samples), "best_s": min(samples), "calls_per_batch": n}


def percentiles(samples: list[float], ps=(50, 90, 99)) -> dict:
    s = sorted(samples)
    return {f"p{p}": s[min(len(s) - 1, int(len(s) * p / 100))] for p in ps}


def write(name: str, data: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **data}, indent=2) + "\n")
    return path


def parse_seeds(value: str) -> tuple[int, ...]:
    """``41,42,43`` (a command-line value, ``--seeds``): distinct non-negative seeds, at least one."""
    try:
        seeds = tuple(int(s) for s in value.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seeds like 41,42,43, got {value!r}") from None
    if not seeds or min(seeds) < 0 or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"expected distinct non-negative seeds, got {value!r}")
    return seeds


def seeds_suffix(seeds: tuple[int, ...] | None) -> str:
    """What a results file's name adds for a run on other seeds than its benchmark's own
    (``-seeds41-42-43``), so it never overwrites the run on record."""
    return f"-seeds{'-'.join(map(str, seeds))}" if seeds else ""
