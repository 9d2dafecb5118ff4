"""Every branch of the cache-aware policy, SGLang's strict inequalities included."""

import random

import pytest

from extproc.config import policy_config
from extproc.policy import CHANCE_CHARS, SESSION_KINDS, Decision, continues, costs, decide, is_imbalanced, is_new_prefix, least_loaded, session_kind
from extproc.tree import Match, RadixTree

CFG = policy_config()


def run(tree, loads, text, cfg=CFG, seed=0):
    return decide(tree, loads, "m", text, 1.0, cfg, random.Random(seed))


def test_imbalance_needs_both_strict_inequalities():
    cfg = policy_config(balance_abs_threshold=64, balance_rel_threshold=1.5)
    assert not is_imbalanced({"a": 64, "b": 0}, cfg)  # 64 - 0 is not > 64
    assert is_imbalanced({"a": 65, "b": 0}, cfg)
    assert not is_imbalanced({"a": 195, "b": 130}, cfg)  # 195 is not > 130 * 1.5
    assert is_imbalanced({"a": 196, "b": 130}, cfg)


def test_imbalance_routes_to_least_loaded_and_still_inserts():
    tree = RadixTree()
    tree.insert("m", "prompt", "a", 0)
    d = run(tree, {"a": 100, "b": 1}, "prompt")
    assert (d.upstream, d.reason) == ("b", "imbalance")
    assert "b" in tree.match("m", "prompt").deepest


def test_hit_above_threshold_goes_to_the_creator():
    tree = RadixTree()
    tree.insert("m", "system prompt shared", "a", 0)
    tree.insert("m", "system prompt shared", "b", 0)
    d = run(tree, {"a": 5, "b": 0}, "system prompt shared + question", policy_config(hit_choice="creator"))
    assert (d.upstream, d.reason) == ("a", "cache_hit")
    assert d.matched == len("system prompt shared")


def test_hit_least_loaded_holder_when_asked():
    tree = RadixTree()
    tree.insert("m", "system prompt shared", "a", 0)
    tree.insert("m", "system prompt shared", "b", 0)
    cfg = policy_config(hit_choice="least_loaded")
    d = run(tree, {"a": 5, "b": 0, "c": 0}, "system prompt shared + question", cfg)
    assert (d.upstream, d.reason) == ("b", "cache_hit")


def test_threshold_is_strict():
    creator = policy_config(hit_choice="creator")
    tree = RadixTree()
    tree.insert("m", "abc", "a", 0)
    # 3 of 10 characters match: 0.3 is not > 0.3, so a miss to the least loaded
    d = run(tree, {"a": 1, "b": 0}, "abcdefghij", creator)
    assert (d.upstream, d.reason) == ("b", "cache_miss")
    tree2 = RadixTree()
    tree2.insert("m", "abcd", "a", 0)
    d = run(tree2, {"a": 1, "b": 0}, "abcdefghij", creator)  # 0.4 > 0.3
    assert (d.upstream, d.reason) == ("a", "cache_hit")


def test_cost_weighs_the_prefix_to_recompute_against_the_queue():
    cfg = policy_config(hit_choice="cost", inflight_cost_chars=1000, inflight_slack=0, continuation_knee=0)
    tree = RadixTree()
    history = "a conversation of its own " * 200  # 5,200 characters only "a" holds
    tree.insert("m", history, "a", 0)
    # a is 5 requests busier: 5,000 < 5,200 characters to recompute elsewhere, so it stays home
    d = run(tree, {"a": 5, "b": 0}, history + "next turn", cfg)
    assert (d.upstream, d.reason, d.matched) == ("a", "cache_hit", len(history))
    # 6 busier: waiting costs more than recomputing, so the cheapest is b (a miss there)
    d = run(tree, {"a": 6, "b": 0, "c": 0}, history + "next turn", cfg)
    assert d.upstream in ("b", "c") and d.reason == "cache_miss"


def test_cost_spreads_sessions_that_share_only_a_short_prefix():
    cfg = policy_config(hit_choice="cost", inflight_cost_chars=2048, inflight_slack=0)
    tree = RadixTree()
    system = "You are a helpful airline agent. " * 30  # ~1,000 characters
    tree.insert("m", system + "session 1", "a", 0)
    tree.insert("m", system + "session 0", "a", 0)  # two sessions: stored texts branch after the prompt
    d = run(tree, {"a": 1, "b": 0}, system + "session 2", cfg)
    assert d.upstream == "b" and d.continuation == ""  # rebuilding 1,000 characters beats queueing behind a request
    fresh = RadixTree()
    fresh.insert("m", system + "session 1", "a", 0)
    d = run(fresh, {"a": 0, "b": 0}, system + "session 3", cfg)
    assert (d.upstream, d.reason) == ("a", "cache_hit")  # equal load: the prefix decides


def test_the_slack_keeps_a_short_conversation_home_through_small_load_differences():
    cfg = policy_config(hit_choice="cost", inflight_cost_chars=1536, inflight_slack=3, continuation_knee=0)
    history = "a short chat " * 130  # 1,690 characters only "a" holds

    def goes_to(loads):
        tree = RadixTree()
        tree.insert("m", history, "a", 0)
        return run(tree, loads, history + "next", cfg).upstream

    # a charged 0, 1 (1,536 < 1,690 to recompute on b), 2 (3,072 > 1,690)
    assert [goes_to({"a": n, "b": 0}) for n in (3, 4, 5)] == ["a", "a", "b"]
    # the slack counts from the least loaded upstream, not from zero
    assert [goes_to({"a": n, "b": 10}) for n in (13, 14, 15)] == ["a", "a", "b"]


def test_cost_terms_are_what_the_decision_weighs():
    cfg = policy_config(hit_choice="cost", inflight_cost_chars=100, inflight_slack=1, continuation_knee=3)
    terms = costs(Match(500, {"a": 500, "b": 200}, ["a"]), {"a": 4, "b": 1, "c": 0}, cfg)
    # deepest 500; free = least loaded (0) + slack (1); not a continuation, so the knee plays no part
    assert terms == {"a": (0, 3, 300), "b": (300, 0, 300), "c": (500, 0, 500)}
    # a continuation: its holder (a) is charged only beyond the knee (3), the others as before
    terms = costs(Match(500, {"a": 500, "b": 200}, ["a"], whole=True), {"a": 4, "b": 1, "c": 0}, cfg)
    assert terms == {"a": (0, 1, 100), "b": (300, 0, 300), "c": (500, 0, 500)}
    # the knee never charges more than the slack would
    terms = costs(Match(500, {"a": 500}, ["a"], whole=True), {"a": 14, "b": 10}, cfg)
    assert terms["a"] == (0, 3, 300)


def test_a_conversation_continuing_its_own_history_stays_home_below_the_knee():
    cfg = policy_config(hit_choice="cost", inflight_cost_chars=1024, inflight_slack=0, continuation_knee=8)
    history = "a short chat " * 100  # 1,300 characters only "a" holds: cheap to rebuild elsewhere

    def goes_to(loads, text):
        tree = RadixTree()
        tree.insert("m", history, "a", 0)
        tree.insert("m", history[:1200] + " a second session", "a", 0)  # the shared part now branches
        whole = tree.match("m", text).whole
        return run(tree, loads, text, cfg).upstream, whole

    # the next turn extends the whole earlier prompt: home up to 8 in flight, and one more (1,024 < 1,300)
    assert [goes_to({"a": n, "b": 0}, history + " next turn") for n in (7, 8, 9, 10)] == [
        ("a", True), ("a", True), ("a", True), ("b", True)]
    # past the knee the usual rule holds: 2 beyond the least loaded cost more than rebuilding 1,300
    assert goes_to({"a": 12, "b": 10}, history + " next turn") == ("b", True)
    assert goes_to({"a": 11, "b": 10}, history + " next turn") == ("a", True)
    # a third session sharing only the part the other two share is not a continuation: the load decides
    assert goes_to({"a": 2, "b": 0}, history[:1200] + " another session") == ("b", False)


def test_the_knee_counts_a_batch_for_each_worker_behind_the_home_router():
    """A router balancing W workers runs W batches: its continuing conversations stay home until it
    has more than knee x W in flight; an upstream whose workers are not known counts as one."""
    cfg = policy_config(hit_choice="cost", inflight_cost_chars=1024, inflight_slack=0, continuation_knee=8)
    history = "a short chat " * 100  # 1,300 characters: one request beyond the allowance moves it

    def goes_to(n, workers):
        tree = RadixTree()
        tree.insert("m", history, "a", 0)
        tree.insert("m", history[:1200] + " a second session", "a", 0)
        return decide(tree, {"a": n, "b": 0}, "m", history + " next turn", 1.0, cfg, random.Random(0), workers=workers).upstream

    assert [goes_to(n, {"a": 3, "b": 3}) for n in (24, 25, 26)] == ["a", "a", "b"]  # 8 x 3, and one more
    assert [goes_to(n, {"a": 1, "b": 3}) for n in (9, 10)] == ["a", "b"]  # the home's own count, not the pool's
    assert [goes_to(n, {"b": 4}) for n in (9, 10)] == ["a", "b"]  # not known: one worker
    assert [goes_to(n, {"a": 0}) for n in (9, 10)] == ["a", "b"]  # a router reporting none still runs one batch
    assert goes_to(10, None) == "b"
    # the terms explain shows: requests charged beyond the home's allowance
    tree = RadixTree()
    tree.insert("m", history, "a", 0)
    m = tree.match("m", history + " next")
    assert costs(m, {"a": 20, "b": 0}, cfg, workers={"a": 2})["a"][1] == 4
    assert costs(m, {"a": 20, "b": 0}, cfg)["a"][1] == 12


def test_a_decision_says_whether_a_continuation_stayed_home():
    cfg = policy_config(hit_choice="cost", inflight_cost_chars=1024, inflight_slack=0, continuation_knee=8)
    history = "a short chat " * 100

    def decision(loads, text):
        tree = RadixTree()
        tree.insert("m", history, "a", 0)
        tree.insert("m", history[:500] + " a second session", "a", 0)
        return run(tree, loads, text, cfg)

    assert decision({"a": 9, "b": 0}, history + " next").continuation == "home"
    assert decision({"a": 10, "b": 0}, history + " next").continuation == "moved"
    assert decision({"a": 0, "b": 0}, history[:500] + " other").continuation == ""  # not a continuation
    assert decision({"a": 100, "b": 0}, history + " next").continuation == "moved"  # imbalance sends it away


def test_the_tail_is_how_far_a_match_runs_past_the_last_branch():
    tree = RadixTree()
    tree.insert("m", "sys|alpha one", "a", 0)
    assert tree.match("m", "sys|alpha two").tail == len("sys|alpha ")  # one stored text: all of it is its own
    tree.insert("m", "sys|beta one", "b", 0)  # texts now branch after "sys|"
    assert tree.match("m", "sys|gamma").tail == 0  # stops at the branch
    assert tree.match("m", "sys|alpha two").tail == len("alpha ")  # runs into alpha's own part
    assert tree.match("m", "sys").tail == 3  # inside the shared edge: nothing branches above it
    # a chain: the next turn extends the first; where one text ends and the next goes on is not a
    # branch, so an edit inside the earlier turn counts the whole chain
    tree.insert("m", "sys|alpha one, then alpha two", "a", 0)
    assert tree.match("m", "sys|alpha one, then X").tail == len("alpha one, then ")
    assert tree.match("m", "sys|alpha one!").tail == len("alpha one")  # stops at the chain's node
    m = tree.match("m", "sys|alpha one, then alpha two, then three")
    assert m.whole and m.tail == len("alpha one, then alpha two")
    assert RadixTree().match("m", "x").tail == 0


def test_a_turn_editing_its_own_history_stays_home_below_the_knee():
    system = "a system prompt that every session shares. " * 20
    chat = "the user's own turns, several hundred characters of them. " * 8

    def decision(n, text, tail=64):
        cfg = policy_config(hit_choice="cost", inflight_cost_chars=1024, inflight_slack=0, continuation_knee=8, continuation_tail=tail)
        tree = RadixTree()
        for up, session in (("a", chat), ("b", "another session's turns"), ("c", "a third session's turns")):
            tree.insert("m", system + session, up, 0)
        return run(tree, {"a": n, "b": 0, "c": 0}, text, cfg)

    edited = system + chat[:300] + " (edited)"  # 300 characters into its own history, then a change
    assert [(decision(n, edited).upstream, decision(n, edited).continuation) for n in (1, 8)] == [("a", "home")] * 2
    # past the knee the usual rule: one request beyond it (1,024) costs more than rebuilding 300
    assert (decision(9, edited).upstream, decision(9, edited).continuation) in (("b", "moved"), ("c", "moved"))
    # off (0): only a whole earlier prompt continues, so one request in flight moves it
    assert decision(1, edited, tail=0).upstream != "a" and decision(1, edited, tail=0).continuation == ""
    # 30 characters past the branch are chance, not history
    short = system + chat[:30] + " (edited)"
    assert decision(1, short).upstream != "a" and decision(1, short).continuation == ""
    assert not continues(Match(100, {}, [], whole=False, tail=63), policy_config(continuation_tail=64))
    assert continues(Match(100, {}, [], whole=False, tail=64), policy_config(continuation_tail=64))
    assert continues(Match(100, {}, [], whole=True, tail=0), policy_config(continuation_tail=0))


def test_only_a_whole_stored_text_that_nothing_extends_is_a_continuation():
    tree = RadixTree()
    tree.insert("m", "system prompt. user: hi", "a", 0)
    assert tree.match("m", "system prompt. user: hi. assistant: hello. user: more").whole
    assert tree.match("m", "system prompt. user: hi").whole  # a retry
    assert not tree.match("m", "system prompt. user: bye").whole  # stops inside it
    assert not tree.match("m", "system").whole  # a prefix of it
    tree.insert("m", "system prompt. user: hi. assistant: hello. user: more", "b", 0)
    # the first turn now goes on in a stored text: only the second is whole
    assert not tree.match("m", "system prompt. user: hi. other").whole
    assert tree.match("m", "system prompt. user: hi. assistant: hello. user: more, and more").whole
    assert not RadixTree().match("m", "anything").whole


def test_hit_on_unhealthy_holder_is_a_miss():
    tree = RadixTree()
    tree.insert("m", "abcdef", "gone", 0)
    d = run(tree, {"a": 0}, "abcdef")
    assert (d.upstream, d.reason) == ("a", "cache_miss")


def test_no_text_balances_by_load_and_inserts_nothing():
    tree = RadixTree()
    d = run(tree, {"a": 3, "b": 1}, "")
    assert (d.upstream, d.reason) == ("b", "no_routing_text")
    assert tree.node_count() == 0


def test_tie_breaks():
    loads = {"a": 0, "b": 0, "c": 0}
    assert least_loaded(loads, "first", random.Random(0)) == "a"
    seen = {least_loaded(loads, "random", random.Random(s)) for s in range(50)}
    assert seen == {"a", "b", "c"}


def test_dry_run_does_not_insert():
    tree = RadixTree()
    decide(tree, {"a": 0}, "m", "text", 0, CFG, random.Random(0), insert=False)
    assert tree.node_count() == 0


FIRST = policy_config(tie_break="first")


def test_every_path_honours_tie_break_first_and_reports_its_fields():
    loads = {"b": 0, "a": 0, "c": 0}
    for seed in range(5):  # "first" never depends on the random draw
        assert run(RadixTree(), loads, "", FIRST, seed).upstream == "b"  # no routing text
        assert run(RadixTree(), loads, "a miss", FIRST, seed).upstream == "b"  # cost rule, all tied
        assert run(RadixTree(), loads, "a miss", policy_config(hit_choice="creator", tie_break="first"), seed).upstream == "b"
        assert run(RadixTree(), {"b": 200, "a": 0, "c": 0}, "x", FIRST, seed).upstream == "a"  # imbalance
    d = run(RadixTree(), {"a": 200, "b": 0}, "some text", FIRST)
    assert (d.reason, d.matched, d.text_len) == ("imbalance", 0, len("some text"))
    d = run(RadixTree(), loads, "a miss", FIRST)
    assert (d.reason, d.matched, d.text_len) == ("cache_miss", 0, len("a miss"))


def test_cost_rule_boundaries():
    tree = RadixTree()
    tree.insert("m", "x" * 30, "a", 0)
    # a match of exactly the threshold is not a hit (strict, as sglang-router)
    d = run(tree, {"a": 0, "b": 5}, "x" * 30 + "y" * 70, policy_config(cache_threshold=0.3))
    assert (d.upstream, d.reason, d.matched) == ("a", "cache_miss", 30)
    d = run(tree, {"a": 0, "b": 5}, "x" * 30 + "y" * 69, policy_config(cache_threshold=0.3))
    assert d.reason == "cache_hit"
    # equal costs with tie_break first: the first in registry order, not the last
    t2 = RadixTree()
    assert run(t2, {"p": 1, "q": 1, "r": 1}, "fresh", FIRST).upstream == "p"
    # an upstream without any match pays the whole deepest match in recompute
    t3 = RadixTree()
    t3.insert("m", "z" * 2000, "a", 0)
    cfg = policy_config(inflight_cost_chars=1000, inflight_slack=0, continuation_knee=0)
    assert run(t3, {"a": 1, "b": 0}, "z" * 2000 + "?", cfg).upstream == "a"  # 1,000 < 2,000
    assert run(t3, {"a": 3, "b": 0}, "z" * 2000 + "!", cfg).upstream == "b"  # 3,000 > 2,000


def test_inserted_times_are_the_decision_time():
    tree = RadixTree()
    decide(tree, {"a": 0}, "m", "remember me", 42.0, CFG, random.Random(0))
    assert tree._roots["m"].children["r"].tenants == {"a": 42.0}


@pytest.mark.parametrize(
    "decision, kind",
    [
        (Decision("a", "cache_hit", 900, 1000, "home"), "continues"),
        (Decision("a", "cache_miss", 0, 1000, "moved"), "moved"),  # moved by load, off its history
        (Decision("a", "imbalance", 0, 1000, "home"), "continues"),  # load chose, and chose its home
        (Decision("a", "cache_hit", 310, 1000), "new_over_threshold"),
        (Decision("a", "cache_miss", 300, 1000), "new"),  # at the threshold is not over it (strict, as sglang-router)
        (Decision("a", "cache_miss", 0, 1000), "new"),
        (Decision("a", "imbalance", 0, 1000), "load_only"),
        (Decision("a", "no_routing_text"), "load_only"),
        (Decision("a", "fallback"), "load_only"),
    ],
)
def test_each_decision_is_one_kind_of_request_to_the_conversations_seen(decision, kind):
    assert session_kind(decision, 0.3) == kind and kind in SESSION_KINDS


# -- new prefixes spread over equally cheap upstreams (--new-prefix-window) -------------------------

SPREAD = policy_config(new_prefix_window=16)
LONG = "a new system prompt nobody has sent " * 40  # 1,440 characters, over --inflight-cost-chars


def test_a_new_prefix_tie_goes_to_the_upstream_that_took_fewest_new_prefixes_lately():
    """Two idle upstreams, one of which took a new prefix lately: every seed sends the next new
    prefix to the other (random ties would send half of them back)."""
    assert len(LONG) >= SPREAD.inflight_cost_chars
    picks = {decide(RadixTree(), {"a": 0, "b": 0}, "m", LONG, 1.0, SPREAD, random.Random(s), insert=False, lately={"a": 1}) for s in range(20)}
    assert {d.upstream for d in picks} == {"b"} and all(d.new_prefix for d in picks)
    # among three, the two with fewest tie at random
    three = {decide(RadixTree(), {"a": 0, "b": 0, "c": 0}, "m", LONG, 1.0, SPREAD, random.Random(s), insert=False, lately={"a": 2, "b": 1, "c": 1}).upstream
             for s in range(30)}
    assert three == {"b", "c"}


def test_with_no_weight_the_new_prefix_count_only_breaks_ties_it_never_outweighs_load():
    """--new-prefix-weight 0 --new-prefix-knee 0 (the rule before them): one request in flight
    outweighs any number of new prefixes taken lately."""
    ties_only = policy_config(new_prefix_window=16, new_prefix_weight=0, new_prefix_knee=0)
    d = decide(RadixTree(), {"a": 0, "b": 1}, "m", LONG, 1.0, ties_only, random.Random(0), insert=False, lately={"a": 5})
    assert d.upstream == "a" and d.new_prefix


@pytest.mark.parametrize("load_a, lately_b, want", [
    (3, 1, "a"),  # a's load is within the knee (3): charged nothing; b's home is charged 2
    (4, 1, "a"),  # one request beyond the knee against one home (2 requests)
    (5, 1, "a"),  # 2 against 2: a tie, to the fewest new prefixes taken lately
    (6, 1, "b"),  # 3 requests beyond the knee outweigh one home
    (6, 2, "a"),  # ... but not two (4)
    (0, 0, "a"),  # no homes anywhere: the least loaded
])
def test_a_new_prefix_is_charged_for_the_homes_an_upstream_took_lately_and_for_load_only_past_the_knee(load_a, lately_b, want):
    """Defaults: each new prefix taken lately beyond the fewest counts as --new-prefix-weight (2)
    requests in flight, and requests are charged only beyond --new-prefix-knee (3)."""
    cfg = policy_config()
    assert (cfg.new_prefix_weight, cfg.new_prefix_knee) == (2, 3)
    loads = {"a": load_a, "b": 0 if load_a else 1}
    picks = {decide(RadixTree(), loads, "m", LONG, 1.0, cfg, random.Random(s), insert=False, lately={"b": lately_b}).upstream for s in range(12)}
    assert picks == {want}, (loads, lately_b, picks)


def test_new_prefix_ties_go_to_the_fewest_taken_then_to_the_least_loaded():
    """Both under the knee (charged nothing), no homes: the less loaded every time, not at random."""
    picks = {decide(RadixTree(), {"a": 2, "b": 1}, "m", LONG, 1.0, SPREAD, random.Random(s), insert=False, lately={}).upstream for s in range(20)}
    assert picks == {"b"}


def test_the_knee_and_the_homes_apply_to_new_prefixes_only():
    """A short new text, or a text continuing a stored one: one request in flight still decides
    (with the knee applied they would tie, and go either way)."""
    short = {decide(RadixTree(), {"a": 1, "b": 0}, "m", LONG[:500], 1.0, SPREAD, random.Random(s), insert=False, lately={"b": 3}).upstream
             for s in range(12)}
    assert short == {"b"}
    terms = costs(RadixTree().match("m", LONG), {"a": 1, "b": 0}, SPREAD)  # not told it is a new prefix
    assert terms["a"][1] == 1 and terms["b"][1] == 0
    terms = costs(RadixTree().match("m", LONG), {"a": 1, "b": 0}, SPREAD, lately={"b": 1})
    assert terms == {"a": (0, 0, 0), "b": (0, 2, 2 * SPREAD.inflight_cost_chars)}


@pytest.mark.parametrize("case", ["short", "matched", "off", "not_cost", "no_counts"])
def test_what_is_not_a_new_prefix_ties_at_random(case):
    """A short text, a text continuing a stored one beyond chance, the spread turned off, another
    hit choice, or no counts given: ties stay random (both upstreams over the seeds)."""
    tree, text, cfg, lately = RadixTree(), LONG, SPREAD, {"a": 1}
    if case == "short":
        text = LONG[: cfg.inflight_cost_chars - 1]
    elif case == "matched":  # both hold its first 64 characters, one chain: it continues that, no new prefix
        for t in ("a", "b"):
            tree.insert("m", LONG[:64] + "x" * 10, t, 0)
    elif case == "off":
        cfg = policy_config(new_prefix_window=0)
    elif case == "not_cost":
        cfg = policy_config(new_prefix_window=16, hit_choice="least_loaded")
    else:
        lately = None
    ds = [decide(tree, {"a": 0, "b": 0}, "m", text, 1.0, cfg, random.Random(s), insert=False, lately=lately) for s in range(20)]
    assert {d.upstream for d in ds} == {"a", "b"} and not any(d.new_prefix for d in ds)


def test_is_new_prefix_bounds():
    long_cfg = policy_config(new_prefix_window=16, inflight_cost_chars=100)
    assert is_new_prefix(Match(CHANCE_CHARS - 1), 100, long_cfg)
    assert not is_new_prefix(Match(CHANCE_CHARS), 100, long_cfg)
    assert not is_new_prefix(Match(0), 99, long_cfg)
    assert not is_new_prefix(Match(0), 100, policy_config(new_prefix_window=0, inflight_cost_chars=100))


SHARED = "a system prompt every session starts with " * 5  # 210 characters, past chance


def _two_sessions_share(tree: RadixTree) -> None:
    """Two earlier sessions, each on its own upstream, branch after ``SHARED``: a third new
    session matches the shared prefix and continues neither."""
    for i, t in enumerate("ab"):
        tree.insert("m", SHARED + f"{i}. " + "q" * 40, t, 0)


@pytest.mark.parametrize("own, cfg, want", [
    (1024, policy_config(), True),  # default --new-prefix-own-chars 1024: a long text of its own
    (1023, policy_config(), False),  # one short
    (2000, policy_config(new_prefix_own_chars=0), False),  # off: the last round's rule
    (2000, policy_config(new_prefix_window=0), False),  # the spread off
])
def test_a_new_session_with_a_long_text_past_a_shared_prefix_is_a_new_prefix(own, cfg, want):
    tree = RadixTree()
    _two_sessions_share(tree)
    text = SHARED + "n" * own
    m = tree.match("m", text)
    assert m.matched >= CHANCE_CHARS and not continues(m, cfg)
    assert is_new_prefix(m, len(text), cfg) is want


def test_a_turn_continuing_its_own_conversation_is_no_new_prefix_however_long():
    """The next turn of a stored conversation brings 2,000 characters of its own: it follows its
    home (the continuation term), it does not start one."""
    tree = RadixTree()
    _two_sessions_share(tree)
    text = SHARED + "0. " + "q" * 40 + "n" * 2000
    m = tree.match("m", text)
    assert continues(m, policy_config()) and not is_new_prefix(m, len(text), policy_config())


def test_a_new_session_past_a_shared_prefix_goes_to_the_router_without_it_when_the_holders_took_the_homes():
    """a and b hold the shared prefix and took a new session each lately; c holds nothing. Past
    the shared prefix the new session is a home: each holder is charged 2 requests (2,048
    characters) for its home, more than rebuilding the 210 shared characters at c. The last
    round's rule (--new-prefix-own-chars 0) priced load alone: it stayed with the holders."""
    tree = RadixTree()
    _two_sessions_share(tree)
    text = SHARED + "n" * 1500
    loads, lately = {"a": 0, "b": 0, "c": 0}, {"a": 1, "b": 1}

    def picks(cfg):
        return {decide(tree, loads, "m", text, 1.0, cfg, random.Random(s), insert=False, lately=lately).upstream for s in range(12)}

    assert picks(policy_config()) == {"c"}
    assert picks(policy_config(new_prefix_own_chars=0)) == {"a", "b"}


def test_a_new_prefix_continuing_a_short_stored_prompt_keeps_its_homes_allowance():
    """A conversation whose first turn was short (under 64 characters: its next, long turn is a new
    prefix) stays home with 5 in flight there, as --continuation-knee allows any continuing turn."""
    tree = RadixTree()
    tree.insert("m", "hi there", "a", 0)
    text = "hi there" + LONG
    m = tree.match("m", text)
    assert continues(m, SPREAD) and is_new_prefix(m, len(text), SPREAD)
    picks = {decide(tree, {"a": 5, "b": 0}, "m", text, 1.0, SPREAD, random.Random(s), insert=False, lately={}).upstream for s in range(12)}
    assert picks == {"a"}


@pytest.mark.parametrize("seed", range(30))
def test_with_no_weight_and_no_knee_the_count_changes_no_cost(seed):
    """--new-prefix-weight 0 --new-prefix-knee 0 (the last round's rule): a new prefix's costs are
    the cost rule's own; the count only breaks exact ties."""
    rng = random.Random(seed)
    ties_only = policy_config(new_prefix_window=16, new_prefix_weight=0, new_prefix_knee=0)
    tree = RadixTree()
    for _ in range(rng.randrange(4)):
        tree.insert("m", "".join(rng.choice("ab") for _ in range(rng.randrange(1, 40))), rng.choice("xyz"), 0)
    m = tree.match("m", "".join(rng.choice("ab") for _ in range(60)))
    loads = {u: rng.randrange(12) for u in "xyz"}
    lately = {u: rng.randrange(4) for u in "xyz"}
    assert costs(m, loads, ties_only, lately) == costs(m, loads, ties_only)


def test_with_no_knee_new_prefix_ties_stay_random_among_the_fewest():
    """--new-prefix-knee 0: ties among upstreams that took as few new prefixes are broken at random
    as the last round's rule broke them, even when their loads differ (two holders of a short
    stored prompt, each under --continuation-knee)."""
    ties_only = policy_config(new_prefix_window=16, new_prefix_weight=0, new_prefix_knee=0)
    tree = RadixTree()
    for t in ("a", "b"):
        tree.insert("m", "hi there", t, 0)
    picks = {decide(tree, {"a": 5, "b": 2}, "m", "hi there" + LONG, 1.0, ties_only, random.Random(s), insert=False, lately={}).upstream
             for s in range(20)}
    assert picks == {"a", "b"}
