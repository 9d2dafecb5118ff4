"""Observed cache hits fed back to the tree (``--observe-feedback``): how much an upstream's share
of the tree may hold, learnt from what its workers report.

The tree believes an upstream holds every prompt sent there until its budget (``--max-tree-size``)
evicts it; the upstream's workers keep far less when their caches are small. A sampled response
whose reported cached prefix is far below what the tree predicted (under ``stale`` of a prediction
of at least ``min_predicted`` characters) says so: the upstream's share of the tree shrinks to
what it holds less ``shrink``, so its least recently used entries go and later decisions stop
counting on them. Any other report lets a shrunk share grow back by ``grow``, up to the configured
budget. Trimming only the reported path would be wrong: serving the request has just put that
prompt back in the worker's cache.

Pure functions of numbers: the director keeps the shares, the simulator (``bench.observed``)
measures the same function.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FeedbackRule:
    # a report below this share of the prediction is stale
    stale: float = 0.5
    # predictions shorter than this say nothing (a worker caches whole 64-character blocks, and a
    # short prefix is cheap to recompute either way)
    min_predicted: int = 1024
    # a stale report shrinks the share to what it holds x (1 - shrink); any other grows it x (1 + grow)
    shrink: float = 0.02
    grow: float = 0.02


def observed_chars(cached_tokens: int, prompt_tokens: int, text_len: int) -> float:
    """The reported cached prefix in routing-text characters: tokens are not characters, so the
    cached share of the prompt is carried over to the routing text."""
    return cached_tokens / prompt_tokens * text_len if prompt_tokens > 0 else 0.0


def is_stale(predicted: int, observed: float, rule: FeedbackRule) -> bool:
    """Whether a report says the upstream no longer holds what the tree predicted."""
    return predicted >= rule.min_predicted and observed < rule.stale * predicted


def next_share(share: float | None, held: int, predicted: int, observed: float, rule: FeedbackRule, ceiling: float) -> float | None:
    """The upstream's share of the tree after one report, or ``None`` for no limit of its own
    (the configured ``ceiling`` applies). ``held``: characters the tree holds for it now."""
    if is_stale(predicted, observed, rule):
        return min(ceiling, held * (1 - rule.shrink))
    if share is None:
        return None
    grown = share * (1 + rule.grow)
    return None if grown >= ceiling else grown
