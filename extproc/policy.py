"""The cache-aware routing policy: SGLang's ``cache_aware`` semantics, one layer up.

Per request (load = in-flight requests per upstream):

1. Imbalance: if ``max_load - min_load > balance_abs_threshold`` and
   ``max_load > min_load * balance_rel_threshold`` (both strict), the least-loaded upstream.
2. Else longest-prefix match; ``match_rate = matched / len(text)``. If ``match_rate >
   cache_threshold``, an upstream holding the deepest match (``hit_choice``: the node's creator as
   sglang-router does, or the least loaded of all holders).
   ``hit_choice = cost`` (the default) instead gives every upstream a cost: the characters it would
   have to recompute that the best-placed upstream would not (deepest match minus its own match)
   plus ``inflight_cost_chars`` for each request it has in flight beyond the least-loaded
   upstream's count plus ``inflight_slack``; the cheapest wins (ties at random). When the request
   continues an earlier conversation of its own (``continues``: it extends a whole earlier prompt,
   as a conversation's next turn or an agent's next step does, or its match runs
   ``continuation_tail`` characters into one earlier chain of prompts, as a turn that edits,
   retries or cuts its history does), the upstreams holding the deepest match are charged only for
   requests beyond ``continuation_knee`` for each worker their router balances (``knee``; if that
   is more): below a batch's knee an extra request costs next to nothing (a decode step is as fast
   with 8 requests as with 1, FIELD-NOTES, and a router of W workers runs W batches), so a
   small load difference must not move a conversation off its own history, however short. A new
   session that shares only a prefix (a system prompt) with several others stops where their texts
   branch and gets no such allowance: sessions piling onto the first holder would fill its batches
   and its cache, so it goes where recompute plus queue is cheapest, and a prefix that any upstream
   could rebuild cheaply no longer pins everyone to one.
   The threshold then only names the outcome (a hit or a miss).
3. Else the least-loaded upstream (``tie_break``: first in registry order as sglang-router 0.3.2, or
   random, its later fix).
4. The text is inserted for the chosen upstream.

A **new prefix** (a text of ``inflight_cost_chars`` or more that matches no stored text beyond
chance, ``CHANCE_CHARS``: a new shared system prompt, a new document; or a new session bringing
``new_prefix_own_chars`` or more characters of its own past a stored prefix it shares) is weighed
with the new prefixes each upstream took among the last ``new_prefix_window`` (``lately``, kept by
the caller: :mod:`extproc.newprefixes`): each one beyond the fewest any upstream took is charged as
``new_prefix_weight`` requests in flight, and requests in flight are charged only beyond
``new_prefix_knee`` (or the least loaded's count, if more; a new prefix that continues a short
stored prompt keeps its home's allowance too). Ties go to the fewest taken lately, then (with a
knee) to the least loaded, then at random. Why: load is not cache room. A new prefix becomes a home
that later requests follow; placed by the load of the moment, several can land on one router while
another holds none, and that router's workers then hold more prefixes than their caches keep
(README, "The decision"). A home is lasting load and lasting cache use; one or two requests in
flight more or less at the moment a new prefix arrives are not. A few characters matched by chance
still count as the cost rule counts them (treating them as no match measured worse on the held-out
set: README, "Choosing the defaults").

Pure decisions over the tree and a load snapshot; the tree knows nothing of this module.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from collections.abc import Mapping

from .tree import Match, RadixTree

# A match this short is chance (a few common words, one 16-token cache block's worth of characters):
# the text is a new prefix for the spread of new prefixes over equally cheap upstreams.
CHANCE_CHARS = 64

HIT_CHOICES = ("cost", "creator", "least_loaded")
TIE_BREAKS = ("random", "first")


@dataclass(frozen=True, slots=True)
class PolicyConfig:
    """The policy's settings; their defaults live with the options (``extproc.config``)."""

    cache_threshold: float
    balance_abs_threshold: int
    balance_rel_threshold: float
    hit_choice: str
    tie_break: str
    inflight_cost_chars: int
    inflight_slack: int = 0  # requests in flight above the least loaded that cost nothing
    continuation_knee: int = 0  # requests in flight that cost a continuing conversation's home nothing
    continuation_tail: int = 0  # a match this far into one earlier chain of texts continues it too (0: off)
    new_prefix_window: int = 0  # new prefixes counted per upstream over the last N (0: off)
    new_prefix_weight: int = 0  # each new prefix an upstream took lately, beyond the fewest, charged as this many requests
    new_prefix_knee: int = 0  # a new prefix is charged in-flight requests only beyond this many (or the least loaded's)
    new_prefix_own_chars: int = 0  # a new session bringing this many characters of its own past a stored prefix is a new prefix too (0: off)


@dataclass(frozen=True, slots=True)
class Decision:
    upstream: str
    reason: str  # cache_hit | cache_miss | imbalance | no_routing_text
    matched: int = 0
    text_len: int = 0
    # for a request continuing an earlier conversation (``continues``): "home" when it went to a
    # holder of the deepest match, "moved" when elsewhere; "" otherwise
    continuation: str = ""
    # a new prefix (``is_new_prefix``) decided by the cost rule: the caller counts it for the upstream
    new_prefix: bool = False


def new_session_rate(d: Decision) -> float | None:
    """The match rate of a decision taken on a prefix match for a request that does not continue an
    earlier conversation (a new session), else ``None``. The chosen upstream holds what this layer
    sent it, so this is about the rate its sglang-router sees: above the router's own
    ``--cache-threshold``, it sends the session to the worker that first stored the shared prefix,
    with every other such session (README, "The sglang-routers behind it")."""
    if d.continuation or d.reason not in ("cache_hit", "cache_miss") or not d.text_len:
        return None
    return d.matched / d.text_len


# What a decision was to the conversations the tree has seen (``session_kind``): a continuing
# conversation kept on an upstream holding its history or moved off it, a new session matched above
# or at most ``cache_threshold`` at its upstream, or none of these (decided by load alone).
SESSION_KINDS = ("continues", "moved", "new_over_threshold", "new", "load_only")
NEW_SESSIONS = ("new_over_threshold", "new")  # the kinds ``new_session_rate`` gives a rate for


def session_kind(d: Decision, cache_threshold: float) -> str:
    """Which of ``SESSION_KINDS`` a decision is. Counted for the status page: the share of new
    sessions over the threshold is what a sglang-router at the same ``--cache-threshold`` sends to
    the one worker that first stored their shared prefix (see ``new_session_rate``)."""
    if d.continuation:
        return "continues" if d.continuation == "home" else "moved"
    rate = new_session_rate(d)
    if rate is None:
        return "load_only"
    return "new_over_threshold" if rate > cache_threshold else "new"


def outcome(own: int, length: int, cache_threshold: float) -> str:
    """What a decision is called by the chosen upstream's own match: a hit above the threshold."""
    return "cache_hit" if own / length > cache_threshold else "cache_miss"


def least_loaded(loads: dict[str, int], tie_break: str, rng: random.Random) -> str:
    """The upstream with the fewest in-flight requests; ``loads`` must not be empty."""
    low = min(loads.values())
    if tie_break == "first":
        return next(a for a, n in loads.items() if n == low)
    return rng.choice([a for a, n in loads.items() if n == low])


def is_imbalanced(loads: dict[str, int], cfg: PolicyConfig) -> bool:
    hi, lo = max(loads.values()), min(loads.values())
    return hi - lo > cfg.balance_abs_threshold and hi > lo * cfg.balance_rel_threshold


def decide(
    tree: RadixTree,
    loads: dict[str, int],
    partition: str,
    text: str,
    now: float,
    cfg: PolicyConfig,
    rng: random.Random,
    *,
    insert: bool = True,
    match: Match | None = None,
    lately: Mapping[str, int] | None = None,
    workers: Mapping[str, int] | None = None,
) -> Decision:
    """Choose an upstream among ``loads`` (healthy upstreams, registry order) for one request.
    ``match``: the text's match in ``tree`` when the caller made it already. ``lately``: how many of
    the last new prefixes each upstream took (``new_prefix_window``; none: ties at random).
    ``workers``: how many workers each upstream's router balances (none known: one each)."""
    if not text:
        return Decision(least_loaded(loads, cfg.tie_break, rng), "no_routing_text")
    m = match if match is not None else tree.match(partition, text)
    new_prefix = False
    if is_imbalanced(loads, cfg):
        choice, reason, matched = least_loaded(loads, cfg.tie_break, rng), "imbalance", 0
    elif cfg.hit_choice == "cost":
        new_prefix = lately is not None and is_new_prefix(m, len(text), cfg)
        choice, reason, matched = _cheapest(m, loads, len(text), cfg, rng, lately if new_prefix else None, workers)
    else:
        matched = m.matched
        holders = [t for t in m.deepest if t in loads]
        if holders and matched / len(text) > cfg.cache_threshold:
            reason = "cache_hit"
            if cfg.hit_choice == "creator":
                choice = holders[0]
            else:
                choice = least_loaded({t: loads[t] for t in holders}, cfg.tie_break, rng)
        else:
            choice, reason = least_loaded(loads, cfg.tie_break, rng), "cache_miss"
    if insert:
        tree.insert(partition, text, choice, now)
    continuation = ("home" if choice in m.deepest else "moved") if continues(m, cfg) else ""
    return Decision(choice, reason, matched, len(text), continuation, new_prefix)


def is_new_prefix(match: Match, length: int, cfg: PolicyConfig) -> bool:
    """Whether a text starts a prefix of its own, long enough to be worth spreading: with the
    spread on (``new_prefix_window``), at least ``inflight_cost_chars`` characters (rebuilding it
    costs more than a request in flight) and matching no stored text beyond chance; or, with
    ``new_prefix_own_chars``, a new session (it continues no conversation of its own) that brings
    that many characters past the stored prefix it shares (a shared system prompt, then a long
    prompt of its own). Either is a home that later turns follow and a cache must keep: placed by
    load alone, new sessions past a shared prefix all stay with the prefix's first holders and a
    router that never got it stays empty however tight its neighbours' caches are. Short new texts
    (a new two-turn chat) are left to load and chance: their footprint in a cache is small."""
    if cfg.new_prefix_window <= 0:
        return False
    if match.matched < CHANCE_CHARS:
        return length >= cfg.inflight_cost_chars
    return 0 < cfg.new_prefix_own_chars <= length - match.matched and not continues(match, cfg)


def continues(match: Match, cfg: PolicyConfig) -> bool:
    """Whether the request carries on an earlier conversation of its own: it extends a whole
    earlier prompt (``Match.whole``), or its match runs ``continuation_tail`` characters or more
    into one earlier chain of prompts (``Match.tail``: a turn that edits, retries or cuts its own
    history). A few characters past a branch are chance; a cache block's worth is not."""
    return match.whole or 0 < cfg.continuation_tail <= match.tail


def knee(cfg: PolicyConfig, upstream: str, workers: Mapping[str, int] | None) -> int:
    """The requests in flight that cost a continuing conversation's home nothing: a decode batch's
    knee (``continuation_knee``) for each worker its router balances (``workers``: as the router
    reports them; an upstream not known counts as one worker). A router of W workers runs W
    batches, so it takes W times one worker's requests before an extra one costs anything."""
    return cfg.continuation_knee * max(1, workers.get(upstream, 1)) if workers else cfg.continuation_knee


def costs(match: Match, loads: dict[str, int], cfg: PolicyConfig, lately: Mapping[str, int] | None = None,
          workers: Mapping[str, int] | None = None) -> dict[str, tuple[int, int, int]]:
    """Each upstream's (recompute characters, requests charged, cost): the terms of the cost rule,
    which the decision weighs and ``explain`` shows. ``lately``: the request is a new prefix, and
    how many of the last new prefixes each upstream took (see module doc). ``workers``: how many
    workers each upstream's router balances (its ``knee``)."""
    matches, deepest = match.tenants, match.matched
    free = min(loads.values()) + cfg.inflight_slack
    homes: Mapping[str, int] = {}
    if lately is not None:  # a new prefix; continuing a short stored prompt, it keeps its home's allowance too
        free = max(free, cfg.new_prefix_knee)
        fewest = min(lately.get(t, 0) for t in loads)
        homes = {t: cfg.new_prefix_weight * (lately.get(t, 0) - fewest) for t in loads}
    continuing = continues(match, cfg)
    out = {}
    for t, n in loads.items():
        own = matches.get(t, 0)
        recompute = deepest - own
        allowance = max(free, knee(cfg, t, workers)) if continuing and own == deepest and deepest else free
        charged = max(0, n - allowance) + homes.get(t, 0)
        out[t] = (recompute, charged, recompute + cfg.inflight_cost_chars * charged)
    return out


def _cheapest(match: Match, loads: dict[str, int], length: int, cfg: PolicyConfig, rng: random.Random,
              lately: Mapping[str, int] | None, workers: Mapping[str, int] | None) -> tuple[str, str, int]:
    """The upstream with the lowest recompute-plus-queue cost; for a new prefix (``lately`` given),
    the homes it took lately charged too, and ties to the upstreams that took the fewest new
    prefixes lately, then (with a knee) to the least loaded of those (see module doc)."""
    terms = costs(match, loads, cfg, lately, workers)
    best = min(cost for _, _, cost in terms.values())
    cheapest = [t for t, (_, _, cost) in terms.items() if cost == best]
    if lately is not None and len(cheapest) > 1:
        fewest = min(lately.get(t, 0) for t in cheapest)
        cheapest = [t for t in cheapest if lately.get(t, 0) == fewest]
        if cfg.new_prefix_knee:  # loads under the knee cost nothing: the least loaded of them, not any
            low = min(loads[t] for t in cheapest)
            cheapest = [t for t in cheapest if loads[t] == low]
    choice = cheapest[0] if cfg.tie_break == "first" else rng.choice(cheapest)
    own = match.tenants.get(choice, 0)
    return choice, outcome(own, length, cfg.cache_threshold), own
