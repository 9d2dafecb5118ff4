"""Observed cache hits fed back to the tree (--observe-feedback): the rule, and the director
cutting an upstream's share of the tree on stale reports and letting it grow back."""

import pytest

from extproc import metrics
from extproc.config import build
from extproc.director import SWEEP_TO, Director, RequestInfo
from extproc.feedback import FeedbackRule, is_stale, next_share, observed_chars

POOL = ["127.0.0.1:1", "127.0.0.1:2"]
RULE = FeedbackRule()


def test_tokens_carry_over_to_characters_as_a_share_of_the_prompt():
    assert observed_chars(25, 100, 4000) == 1000
    assert observed_chars(0, 0, 4000) == 0.0  # no prompt tokens reported: nothing observed


@pytest.mark.parametrize(
    "predicted, observed, stale",
    [(2000, 999, True), (2000, 1000, False), (2000, 1800, False), (1024, 0, True), (1023, 0, False), (0, 0, False)],
)
def test_a_report_is_stale_under_half_of_a_long_enough_prediction(predicted, observed, stale):
    assert is_stale(predicted, observed, RULE) is stale


def test_a_stale_report_cuts_the_share_to_what_is_held_less_the_shrink():
    assert next_share(None, 10_000, 2000, 100, RULE, 1e9) == pytest.approx(9_800)
    assert next_share(5_000, 10_000, 2000, 100, RULE, 1e9) == pytest.approx(9_800)  # from what it holds, not the old share
    assert next_share(None, 10_000, 2000, 100, RULE, 4_000) == 4_000  # never above the ceiling


def test_other_reports_grow_a_cut_share_back_until_the_ceiling_frees_it():
    assert next_share(None, 10_000, 2000, 1900, RULE, 1e9) is None  # never cut: stays unlimited
    assert next_share(5_000, 10_000, 2000, 1900, RULE, 1e9) == pytest.approx(5_100)
    assert next_share(5_000, 10_000, 500, 0, RULE, 1e9) == pytest.approx(5_100)  # too short to judge: not stale
    assert next_share(5_000, 10_000, 2000, 1900, RULE, 5_050) is None


def feed_director(feedback: bool = True, max_tree_size: int = 1 << 20) -> Director:
    d = Director(build({"upstreams": POOL, "observe_feedback": str(feedback).lower(), "max_tree_size": str(max_tree_size)}, env={}), seed=1)
    d.set_upstreams(POOL)
    for i in range(40):
        d.tree.insert("", f"{i:02d} " + "q" * 500, POOL[0], float(i))
    d.tree.insert("", "kept " + "k" * 500, POOL[1], 0.0)
    return d


def report(d: Director, upstream: str, predicted: int, length: int, cached_share: float) -> None:
    info = RequestInfo(upstream=upstream, matched=predicted, text_len=length)
    d.observed(info, 1000, int(1000 * cached_share))


def sweep(d: Director) -> None:
    for _ in d.evict_slices(slice_secs=0.0):
        pass


def test_a_stale_report_shrinks_only_that_upstreams_share_and_the_sweep_evicts_to_it():
    d = feed_director()
    woken = []
    d.wake_sweeper = lambda: woken.append(1)
    held, other = d.tree.held(POOL[0]), d.tree.held(POOL[1])
    shrinks = metrics.TREE_SHRINKS.labels(POOL[0])._value.get()
    report(d, POOL[0], 4000, 5000, 0.1)  # the tree promised 80 %, the workers had 10 %
    assert woken and metrics.TREE_SHRINKS.labels(POOL[0])._value.get() == shrinks + 1
    assert d.budget(POOL[0]) < d.cfg.max_tree_size and d.budget(POOL[1]) == d.cfg.max_tree_size
    sweep(d)
    assert held * 0.97 <= d.tree.held(POOL[0]) <= held * (1 - RULE.shrink) + 1
    assert d.tree.held(POOL[1]) == other
    assert d.tree_stats().learnt_budget_per_upstream == {POOL[0]: d.budget(POOL[0])}


def test_the_learnt_budget_limits_what_is_learnt_until_reports_confirm_the_tree_again():
    d = feed_director()
    report(d, POOL[0], 4000, 5000, 0.1)
    sweep(d)
    cut = d.budget(POOL[0])
    assert cut == int(d.shares[POOL[0]] / SWEEP_TO)
    d._insert("", "n" * cut, POOL[0], 100.0)  # takes it past its learnt budget ...
    refused = metrics.INSERTS_REFUSED._value.get()
    d._insert("", "m" * 10, POOL[0], 101.0)  # ... so the next is refused
    assert metrics.INSERTS_REFUSED._value.get() == refused + 1 and d.tree.match("", "m" * 10).matched == 0
    for _ in range(10):
        report(d, POOL[0], 4000, 5000, 0.8)  # confirmed
    assert d.budget(POOL[0]) > cut
    while POOL[0] in d.shares:
        report(d, POOL[0], 4000, 5000, 0.8)
    assert d.budget(POOL[0]) == d.cfg.max_tree_size and d.tree_stats().learnt_budget_per_upstream == {}


def test_without_the_option_reports_are_exported_but_never_touch_the_tree():
    d = feed_director(feedback=False)
    held = d.tree.held(POOL[0])
    report(d, POOL[0], 4000, 5000, 0.0)
    sweep(d)
    assert d.shares == {} and d.tree.held(POOL[0]) == held
    assert d.observed_hits()[POOL[0]][0] == 0.0


def test_an_upstream_that_leaves_the_pool_or_a_reload_that_turns_it_off_forgets_its_share():
    d = feed_director()
    report(d, POOL[0], 4000, 5000, 0.1)
    report(d, POOL[1], 4000, 5000, 0.1)
    d.set_upstreams([POOL[1]])
    assert set(d.shares) == {POOL[1]}
    d.reconfigure(build({"upstreams": POOL, "observe_feedback": "false"}, env={}))
    assert d.shares == {}


def test_a_share_is_never_above_the_configured_budget():
    d = feed_director(max_tree_size=4_000)
    report(d, POOL[0], 4000, 5000, 0.1)  # the tree held far more than the new limit when the report came
    assert d.budget(POOL[0]) <= 4_000
