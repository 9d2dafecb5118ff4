"""Shared helpers of the benchmarks: timing, results files, machine facts."""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
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
    """``41,42,43`` or ``200-299`` (a command-line value, ``--seeds``; a range is inclusive, and
    both forms mix): distinct non-negative seeds, at least one."""
    seeds: list[int] = []
    for part in value.split(","):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part.strip())
        if m is None or (m[2] is not None and int(m[2]) < int(m[1])):
            raise argparse.ArgumentTypeError(f"expected seeds like 41,42,43 or 200-299, got {value!r}")
        seeds += range(int(m[1]), int(m[2] or m[1]) + 1)
    if len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"expected distinct seeds, got {value!r}")
    return tuple(seeds)


def _is_range(seeds: tuple[int, ...]) -> bool:
    """More than three consecutive seeds, written as their first and last."""
    return len(seeds) > 3 and seeds == tuple(range(seeds[0], seeds[0] + len(seeds)))


def seeds_suffix(seeds: tuple[int, ...] | None) -> str:
    """What a results file's name adds for a run on other seeds than its benchmark's own
    (``-seeds41-42-43``; a range ``-seeds200to299``), so it never overwrites the run on record."""
    if not seeds:
        return ""
    return f"-seeds{seeds[0]}to{seeds[-1]}" if _is_range(seeds) else f"-seeds{'-'.join(map(str, seeds))}"


def seeds_flag(seeds: tuple[int, ...]) -> str:
    """The ``--seeds`` value that gives these seeds again (``41,42,43``; a range ``200-299``)."""
    return f"{seeds[0]}-{seeds[-1]}" if _is_range(seeds) else ",".join(map(str, seeds))


def seeds_words(seeds: tuple[int, ...]) -> str:
    """The seeds for a report's prose (``41, 42, 43``; a range ``200–299``)."""
    return f"{seeds[0]}–{seeds[-1]}" if _is_range(seeds) else ", ".join(map(str, seeds))
