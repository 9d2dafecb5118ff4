"""Upper-layer policies compared by the evaluation: which SGLang router gets a request.

``PrefixRouter`` is this project's real code (payload parser, radix tree, policy) in process; the
others are what operators run today or what the alternatives do, as FIELD-NOTES describes them.
"""

from __future__ import annotations

import hashlib
import random
from collections import OrderedDict

import orjson

from extproc.dev.fakeworker import BLOCK_TOKENS, CHARS_PER_TOKEN
from extproc.payload import routing_input
from extproc.config import DEFAULTS, policy_config
from extproc.feedback import FeedbackRule, is_stale, next_share, observed_chars
from extproc.newprefixes import NewPrefixes
from extproc.policy import PolicyConfig, costs, decide, least_loaded, new_session_rate
from extproc.sessions import Session, SessionBook, decide_following, report
from extproc.tree import Match, RadixTree


def _loads(sim) -> dict[str, int]:
    return {str(i): r.inflight for i, r in enumerate(sim.routers)}


def router_workers(sim) -> dict[str, int]:
    """Each router's workers, as the service reads them from its worker list (--workers-endpoint)."""
    return {str(i): len(r.workers) for i, r in enumerate(sim.routers)}


class PrefixRouter:
    """``count_workers``: the routers' workers known (the default, --workers-endpoint), or every
    router counted as one worker (``--workers-endpoint ''``, or routers that do not say)."""

    def __init__(self, cfg: PolicyConfig = policy_config(), form: str = "sglang", count_workers: bool = True) -> None:
        self.cfg, self.form, self.count_workers = cfg, form, count_workers
        self.tree = RadixTree()
        self.new_prefixes = NewPrefixes(cfg.new_prefix_window)  # as the director keeps them (--new-prefix-window)
        self.last_reason = ""
        # what the service's prefix_router_new_session_match_rate observes, decision by decision
        self.new_session_rates: list[float] = []

    def workers(self, sim) -> dict[str, int] | None:
        return router_workers(sim) if self.count_workers else None

    def choose(self, p, sim) -> int:
        text = p.sglang_text if self.form == "sglang" else p.texts.get(self.form)
        if text is None:
            text = p.texts[self.form] = routing_input("/v1/chat/completions", p.body, **{**DEFAULTS.parse_options(), "form": self.form}).text
        d = decide(self.tree, _loads(sim), p.partition, text, sim.now, self.cfg, sim.rng, lately=self.new_prefixes.counts,
                   workers=self.workers(sim))
        self.new_prefixes.took(d.upstream, d.new_prefix)
        self.last_reason = d.reason
        self.last_decision = d
        rate = new_session_rate(d)
        if rate is not None:
            self.new_session_rates.append(rate)
        return int(d.upstream)


class ObservedHits(PrefixRouter):
    """The default policy with observed cache hits fed back, as ``--observe-feedback`` does it
    (the same functions, extproc.feedback): for a ``sample`` of requests the upstream's answer
    reports the cached prefix (``cached_tokens``); a stale report cuts the upstream's share of the
    tree (its least recently used entries go at once), other reports let it grow back."""

    def __init__(self, sample: float = 1.0, seed: int = 0, rule: FeedbackRule = FeedbackRule()) -> None:
        super().__init__()
        self.sample, self.rule = sample, rule
        self.share: dict[str, float] = {}
        self.pending: dict[int, tuple[str, int, int]] = {}
        self.sampler = random.Random(seed)

    def choose(self, p, sim) -> int:
        r = super().choose(p, sim)
        up = str(r)
        d = self.last_decision
        if d.text_len and self.sampler.random() < self.sample:
            self.pending[id(p)] = (up, d.matched, d.text_len)
        share = self.share.get(up)
        if share is not None and self.tree.held(up) > share:
            self.tree.evict(up, int(share))
        return r

    def finished(self, p, r, sim) -> None:
        rec = self.pending.pop(id(p), None)
        if rec is None:
            return
        up, predicted, length = rec
        observed = observed_chars(sim.last_hit, p.prompt_tokens, length)
        share = next_share(self.share.get(up), self.tree.held(up), predicted, observed, self.rule, float("inf"))
        if share is None:
            self.share.pop(up, None)
            return
        self.share[up] = share
        if is_stale(predicted, observed, self.rule):
            self.tree.evict(up, int(share))


class RoundRobin:
    def __init__(self) -> None:
        self.n = 0

    def choose(self, p, sim) -> int:
        self.n += 1
        return self.n % len(sim.routers)


class Random:
    def choose(self, p, sim) -> int:
        return sim.rng.randrange(len(sim.routers))


class LeastLoaded:
    def choose(self, p, sim) -> int:
        return int(least_loaded(_loads(sim), "random", sim.rng))


class LeastRequest:
    """Envoy's LEAST_REQUEST with equal weights: the less loaded of two routers drawn at random
    (power of two choices), not the least loaded of all."""

    def choose(self, p, sim) -> int:
        a, b = sim.rng.sample(range(len(sim.routers)), 2) if len(sim.routers) > 1 else (0, 0)
        return a if sim.routers[a].inflight <= sim.routers[b].inflight else b


def _hashed(key: str, routers: int) -> int:
    """The router a hash of ``key`` picks: a stable hash (Python's ``hash()`` is salted per process)."""
    h = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(h, "big") % routers


class ConsistentHash:
    """Hash of the routing text's first ``k`` characters (a common gateway option)."""

    def __init__(self, k: int = 2048) -> None:
        self.k = k

    def choose(self, p, sim) -> int:
        return _hashed(p.sglang_text[: self.k], len(sim.routers))


class SessionHash:
    """Envoy's ring hash on the conversation's id (``x-session-id``, which the clients send; bench.e2e's
    "envoy session hash"): every turn of a session on one router, whatever its prefix or the load.
    Modulo the routers rather than a ring: the same stickiness, the shares a little more even."""

    def choose(self, p, sim) -> int:
        return _hashed(str(p.req.session), len(sim.routers))


class LiteLLM:
    """LiteLLM's prompt-caching routing as of its releases up to about 1.80 ("v1" in FIELD-NOTES):
    SHA-256 of the canonical JSON of ``{"messages": ...}``, stored after a successful response
    when the prompt has >= 1024 tokens (TTL 300 s, 200 items); a lookup tries the whole list, then
    without its last 1, 2 and 3 messages; else random. Kept for fast sweeps; the real proxy (a
    later release, with chained per-message digests) is measured by ``bench.litellm``."""

    def __init__(self, ttl: float = 300.0, size: int = 200, min_tokens: int = 1024) -> None:
        self.ttl, self.size, self.min_tokens = ttl, size, min_tokens
        self.store: OrderedDict[str, tuple[int, float]] = OrderedDict()
        self.last_reason = ""

    @staticmethod
    def key(messages: list) -> str:
        return hashlib.sha256(orjson.dumps({"messages": messages}, option=orjson.OPT_SORT_KEYS)).hexdigest()

    def choose(self, p, sim) -> int:
        msgs = p.req.messages
        for drop in range(0, 4):
            if drop >= len(msgs):
                break
            hit = self.store.get(self.key(msgs[: len(msgs) - drop]))
            if hit is not None and sim.now - hit[1] <= self.ttl:
                self.last_reason = "cache_hit"
                return hit[0]
        self.last_reason = "random"
        return sim.rng.randrange(len(sim.routers))

    def finished(self, p, r: int, sim) -> None:
        if p.prompt_tokens < self.min_tokens:
            return
        k = self.key(p.req.messages)
        self.store[k] = (r, sim.now)
        self.store.move_to_end(k)
        while len(self.store) > self.size:
            self.store.popitem(last=False)


class TrueCache:
    """Knows every worker's cache (no real router can). ``greedy``: the router whose best worker
    holds the longest cached prefix of this very prompt (ties to the least loaded). Otherwise the
    default policy's cost rule computed from the true cached lengths instead of the tree's guess
    (a tree of its own still tells whether the request continues an earlier conversation).
    Not an upper bound (its greed can cost later hits): the bound is the simulator's
    ``reuse_bound``."""

    def __init__(self, greedy: bool = False) -> None:
        self.greedy = greedy
        self.tree = RadixTree()

    def choose(self, p, sim) -> int:
        loads = [r.inflight for r in sim.routers]
        chars = [max(sim.workers[w].cache.cached_blocks(p.keys) for w in r.workers) * BLOCK_TOKENS * CHARS_PER_TOKEN for r in sim.routers]
        if self.greedy:
            best = max(chars)
            return int(least_loaded({str(i): loads[i] for i in range(len(loads)) if chars[i] == best}, "random", sim.rng))
        own = self.tree.match(p.partition, p.sglang_text)
        m = Match(max(chars), {str(i): c for i, c in enumerate(chars)}, [], own.whole, own.tail)
        terms = costs(m, {str(i): n for i, n in enumerate(loads)}, policy_config(), workers=router_workers(sim))
        low = min(cost for _, _, cost in terms.values())
        choice = sim.rng.choice([t for t, (_, _, cost) in terms.items() if cost == low])
        self.tree.insert(p.partition, p.sglang_text, choice, sim.now)
        return int(choice)


class Single:
    """The one-layer reference: a single sglang-router over all N x W workers (topology of 1 router)."""

    def choose(self, p, sim) -> int:
        return 0


def upper_policies(service_threshold: float | None = None) -> dict[str, object]:
    """Fresh instances, keyed by the names the report uses. ``prefix-router`` is the shipped
    default; the ``prefix-router/...`` variants are its alternatives, kept selectable.
    ``service_threshold``: the service's ``--cache-threshold`` for every rule of this project,
    when not its default (an operator raising it with the routers' own)."""
    own = {} if service_threshold is None else {"cache_threshold": service_threshold}

    def cfg(**overrides: object) -> PolicyConfig:
        return policy_config(**own, **overrides)

    return {
        # the default follows sessions (--move-evicted-sessions), reading the responses of the
        # turns it could move (duplex mode)
        "prefix-router": MovingSessions(cfg=cfg()),
        "prefix-router/template": PrefixRouter(cfg(), form="template"),
        "prefix-router/creator": PrefixRouter(cfg(hit_choice="creator")),
        "prefix-router/least-loaded-hit": PrefixRouter(cfg(hit_choice="least_loaded")),
        "prefix-router/sglang-0.3.2": PrefixRouter(cfg(hit_choice="creator", tie_break="first")),
        # earlier defaults: the last round's (every router counted as one worker, its knee 8 however
        # many workers it balances: --workers-endpoint ''), the one before (only texts matching
        # nothing stored are new prefixes), the one before that (new prefixes spread over exact ties
        # only), and before it none spreading new prefixes (--new-prefix-window 0): sessions moved,
        # sessions not followed (--no-move-evicted-sessions), only whole prompts continuing (no
        # tail), the rule without its continuation term, and an earlier round's tuning winner, which
        # the held-out set did not confirm. Each counted one worker per router, as it shipped.
        "prefix-router/workers-unknown": MovingSessions(cfg=cfg(), count_workers=False),
        "prefix-router/unshared-only": MovingSessions(cfg=cfg(new_prefix_own_chars=0), count_workers=False),
        "prefix-router/ties-only": MovingSessions(cfg=cfg(new_prefix_weight=0, new_prefix_knee=0, new_prefix_own_chars=0), count_workers=False),
        "prefix-router/no-spread": MovingSessions(cfg=cfg(new_prefix_window=0), count_workers=False),
        "prefix-router/no-move": PrefixRouter(cfg(new_prefix_window=0), count_workers=False),
        "prefix-router/previous-default": PrefixRouter(cfg(continuation_tail=0, new_prefix_window=0), count_workers=False),
        "prefix-router/knee-0": PrefixRouter(cfg(continuation_knee=0, continuation_tail=0, new_prefix_window=0)),
        "prefix-router/slack-3": PrefixRouter(cfg(continuation_knee=0, continuation_tail=0, inflight_slack=3, inflight_cost_chars=1536, new_prefix_window=0)),
        # the default with every response read (--observe-sample 1)
        "prefix-router/move-evicted": MovingSessions(sample=1.0, cfg=cfg()),
        "round-robin": RoundRobin(),
        "random": Random(),
        "least-loaded": LeastLoaded(),
        "consistent-hash": ConsistentHash(),
        "litellm-v1": LiteLLM(),
        "true-cache-cost": TrueCache(),
        "true-cache-greedy": TrueCache(greedy=True),
    }


class MovingSessions(PrefixRouter):
    """The default policy (``--move-evicted-sessions``, on by default): extproc.sessions' book follows each
    session, and the responses of the turns whose report may move one report their cached prefix
    (``SessionBook.worth_reading``: what the director reads in duplex mode), as do a ``sample`` of
    the others (``--observe-sample``).
    ``reads`` counts the responses read, ``decisions`` the requests: the reading's cost."""

    def __init__(self, family_turns: float = 6.0, sample: float = 0.0, seed: int = 0, cfg: PolicyConfig = policy_config(),
                 count_workers: bool = True) -> None:
        super().__init__(cfg, count_workers=count_workers)
        self.book = SessionBook(self.cfg.cache_threshold, family_turns)
        self.sample, self.sampler, self.rule = sample, random.Random(seed), FeedbackRule()
        self.pending: dict[int, tuple[Session, int, int, int]] = {}
        self.moves = self.reads = self.decisions = 0

    def choose(self, p, sim) -> int:
        d, session, moved = decide_following(self.book, self.tree, _loads(sim), p.partition, p.sglang_text, self.cfg, sim.rng,
                                             self.new_prefixes.counts, self.workers(sim))
        self.new_prefixes.took(d.upstream, d.new_prefix)
        if p.sglang_text:
            self.tree.insert(p.partition, p.sglang_text, d.upstream, sim.now)
        self.moves += moved
        self.last_reason, self.last_decision = d.reason, d
        rate = new_session_rate(d)
        if rate is not None:
            self.new_session_rates.append(rate)
        self.decisions += 1
        if self.sampler.random() < self.sample or (session is not None and self.book.worth_reading(session, d.text_len)):
            self.reads += 1
            if session is not None:
                self.pending[id(p)] = (session, session.turns, d.matched, d.text_len)
        return int(d.upstream)

    def finished(self, p, r, sim) -> None:
        rec = self.pending.pop(id(p), None)
        if rec is not None:
            session, turn, predicted, length = rec
            report(session, turn, is_stale(predicted, observed_chars(sim.last_hit, p.prompt_tokens, length), self.rule))
