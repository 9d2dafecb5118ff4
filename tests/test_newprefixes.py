"""The window of new prefixes per upstream: bounded, and forgetting the oldest."""

from extproc.newprefixes import NewPrefixes


def test_counts_cover_only_the_last_window_and_drop_upstreams_at_zero():
    w = NewPrefixes(3)
    for up in ("a", "a", "b"):
        w.took(up)
    assert w.counts == {"a": 2, "b": 1}
    w.took("c")  # the first "a" leaves the window
    assert w.counts == {"a": 1, "b": 1, "c": 1} and len(w.recent) == 3
    for _ in range(3):
        w.took("c")
    assert w.counts == {"c": 3}  # a and b gone, not kept at zero


def test_memory_stays_at_the_window_whatever_the_traffic():
    w = NewPrefixes(16)
    for i in range(10_000):
        w.took(f"10.0.0.{i % 500}:80")
    assert len(w.recent) == 16 and sum(w.counts.values()) == 16 and len(w.counts) <= 16


def test_a_window_of_zero_counts_nothing():
    w = NewPrefixes(0)
    w.took("a")
    assert not w.counts and not w.recent
