"""The sync messages and the peer table, without NATS."""

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from extproc.replicas import Outbox, Peers, Seen
from extproc.syncwire import (
    Placement, SessionNote, SnapshotReader, WireError, compress_records, decode_event, decode_snapshot_header, encode_events, snapshot_header,
)
from extproc.tree import RadixTree

RID = "0123456789abcdef"


def test_events_round_trip_and_split_to_fit_the_payload_limit():
    placements = [Placement("p", "10.0.0.1:80", f"text {i} " * 200) for i in range(100)]
    finishes = [(RID + "t" * 22, "failed")]
    msgs = encode_events(RID, 7, 10, {"10.0.0.1:80": 3}, placements, finishes, True, max_bytes=16 * 1024, ejections=[("10.0.0.2:80", 2.0)])
    assert len(msgs) > 5 and all(len(m) <= 16 * 1024 for m in msgs)
    evs = [decode_event(m, 1 << 20) for m in msgs]
    assert [e.seq for e in evs] == list(range(10, 10 + len(msgs)))
    assert [p for e in evs for p in e.placements] == placements
    assert [f for e in evs for f in e.finishes] == finishes
    assert [j for e in evs for j in e.ejections] == [("10.0.0.2:80", 2.0)]
    assert [e.lost for e in evs] == [True] + [False] * (len(evs) - 1)  # said once
    assert all(e.counts == {"10.0.0.1:80": 3} for e in evs)


def test_session_notes_round_trip_after_the_placements_they_name():
    """A note names a session by its latest prompt, which the placements before it carry: split
    over messages, no note may come before a placement sent before it."""
    placements = [Placement("p", "10.0.0.1:80", f"text {i} " * 200) for i in range(40)]
    notes = [SessionNote("p", 1600 + i, "t" * 1024, "anchor é" + str(i), ("evicted", "cached", "moved")[i % 3]) for i in range(30)]
    reports = [(f"request-{i}", i % 2 == 0) for i in range(5)]  # read here, decided by another replica
    msgs = encode_events(RID, 1, 1, {}, placements, [], False, max_bytes=8 * 1024, sessions=notes, reports=reports)
    evs = [decode_event(m, 1 << 20) for m in msgs]
    assert [n for e in evs for n in e.sessions] == notes
    assert [r for e in evs for r in e.reports] == reports
    first_note = next(i for i, e in enumerate(evs) if e.sessions)
    assert sum(len(e.placements) for e in evs[: first_note + 1]) == len(placements)


def test_a_placement_too_long_for_a_message_is_cut_to_a_prefix():
    long = "abc" * 100_000
    (msg,) = encode_events(RID, 1, 1, {}, [Placement("", "h:1", long)], [], False, max_bytes=64 * 1024)
    (p,) = decode_event(msg, 1 << 20).placements
    assert 0 < len(p.text) < len(long) and long.startswith(p.text) and len(msg) <= 64 * 1024


def test_an_empty_event_still_carries_the_counts():
    (msg,) = encode_events(RID, 1, 5, {"a:1": 2}, [], [], False, 4096)
    ev = decode_event(msg, 10)
    assert (ev.seq, ev.counts, ev.placements) == (5, {"a:1": 2}, ())


GOOD = {"v": 1, "k": "ev", "r": RID, "e": 1, "s": 1, "l": [["a:1", 1]]}


@pytest.mark.parametrize("change, reason", [
    ({"v": 2}, "version"), ({"k": "x"}, "not_an_event"), ({"r": "ABC"}, "replica_id"), ({"e": -1}, "epoch"),
    ({"s": "1"}, "seq"), ({"l": [["a:1", True]]}, "counts"), ({"l": {"a": 1}}, "counts"),
    ({"p": [["", "a:1"]]}, "placements"), ({"p": [["", "a:1", "x" * 11]]}, "text_too_long"),
    ({"f": [["t", "maybe"]]}, "finishes"), ({"x": 1}, "lost"), ({"j": [["a:1", 0]]}, "ejections"),
    ({"j": [["a:1", 1e9]]}, "ejections"), ({"j": [["a:1", True]]}, "ejections"),
    ({"q": [["", 5, "tail", "anchor", "gone"]]}, "sessions"), ({"q": [["", 5, "tail", "anchor"]]}, "sessions"),
    ({"q": [["", 11, "tail", "anchor", "moved"]]}, "sessions"), ({"q": [["", -1, "tail", "anchor", "moved"]]}, "sessions"),
    ({"q": [["", 5, "t" * 1025, "anchor", "moved"]]}, "sessions"), ({"q": [["", 5, "tail", "a" * 65, "moved"]]}, "sessions"),
    ({"q": {"a": 1}}, "sessions"), ({"o": [["request", 1]]}, "reports"), ({"o": [["r" * 129, True]]}, "reports"),
    ({"o": [["request"]]}, "reports"),
])
def test_each_malformed_field_is_refused_with_its_reason(change, reason):
    with pytest.raises(WireError) as e:
        decode_event(orjson.dumps({**GOOD, **change}), 10)
    assert e.value.reason == reason


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=200), st.recursive(
    st.none() | st.booleans() | st.integers(-(1 << 63), (1 << 63) - 1) | st.text(max_size=20),
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.sampled_from(list("vkrespflx")), c, max_size=9), max_leaves=30,
).map(orjson.dumps)))
def test_nothing_on_the_wire_raises_anything_but_a_wire_error(data):
    try:
        decode_event(data, 100)
    except WireError:
        pass


def test_peers_sum_counts_spot_gaps_and_remember_the_silent():
    p = Peers(timeout=1.0)
    assert p.observe(RID, 1, 1, {"a": 2}, now=0) == (Seen.NEW, 0)
    assert p.observe("f" * 16, 1, 1, {"a": 1, "b": 1}, now=0)[0] is Seen.NEW
    assert p.totals == {"a": 3, "b": 1}
    assert p.observe(RID, 1, 2, {"a": 0}, now=0.5) == (Seen.NEXT, 0)
    assert p.totals == {"a": 1, "b": 1}
    assert p.observe(RID, 1, 5, {"a": 4}, now=0.6) == (Seen.GAP, 2)
    assert p.observe(RID, 1, 4, {"a": 9}, now=0.7) == (Seen.OLD, 0)  # late: its counts are stale
    assert p.totals == {"a": 5, "b": 1}
    assert p.expire(now=1.2) == ["f" * 16]
    assert p.totals == {"a": 4}
    assert p.observe("f" * 16, 1, 9, {}, now=2.0) == (Seen.GAP, 7)  # back after a partition: 7 missed
    assert p.observe(RID, 2, 0, {"b": 1}, now=2.0)[0] is Seen.NEW  # restarted: a new epoch
    assert p.totals == {"b": 1}


def test_the_outbox_is_bounded_and_counts_what_it_drops():
    woken = []
    box = Outbox(limit=2)
    box.wake = lambda: woken.append(1)
    for i in range(5):
        box.place("", f"t{i}", "a:1")
    assert len(woken) == 1  # once per batch
    placements, finishes, lost, dropped, ejections, sessions, reports = box.take()
    assert len(placements) == 2 and dropped == 3 and not box.dirty
    small = Outbox(limit=100, max_chars=10)  # and bounded in the text it holds
    for i in range(5):
        small.place("", "abcd", "a:1")
    placements, _, _, dropped, *_ = small.take()
    assert len(placements) == 2 and dropped == 3
    notes = Outbox(limit=2)  # session notes too
    for i in range(3):
        notes.note(SessionNote("", 10, "t" * 10, f"a{i}", "evicted"))
    *_, dropped, _, sessions, _ = notes.take()
    assert [n.anchor for n in sessions] == ["a0", "a1"] and dropped == 1


def test_a_snapshot_rebuilds_the_tree():
    src = RadixTree()
    texts = [f"shared system prompt. user {i}: " + "question " * i for i in range(200)]
    for i, t in enumerate(texts):
        src.insert(f"p{i % 3}", t, f"up{i % 4}", now=float(i))
    records = [None if rec is None else (rec[0], rec[1], [(u, 0) for u in rec[2]]) for rec in src.branch_ends(step=16)]
    assert None in records  # the walk lets its caller breathe
    chunks = [c for c in compress_records(records, 512) if c is not None]
    assert len(chunks) > 1
    reader = SnapshotReader(max_text=1 << 20, max_bytes=1 << 22)
    dst = RadixTree()
    for c in chunks:
        for p, t, tenants in reader.feed(c):
            for u, _ in tenants:
                dst.insert(p, t, u, now=0.0)
    assert dst.tenant_chars() == src.tenant_chars() and dst.node_count() == src.node_count()
    assert reader.bad == 0


def test_a_corrupt_snapshot_is_refused():
    reader = SnapshotReader(100, 1000)
    with pytest.raises(WireError):
        reader.feed(b"not zlib at all")
    assert decode_snapshot_header(snapshot_header(RID, {RID: (1, 2)})) == {RID: (1, 2)}
    with pytest.raises(WireError):
        decode_snapshot_header(orjson.dumps({"v": 1, "k": "snap", "w": {"x": [1, 2]}}))


def test_a_snapshot_walk_lets_decisions_run_between_slices():
    from extproc.config import build
    from extproc.director import Director

    d = Director(build({"upstreams": ["a:1"]}, env={}))
    d.set_upstreams(["a:1"])
    for i in range(50):
        d._insert("", f"text {i} " * 20, "a:1", 0.0)
    out = list(d.snapshot_records(slice_secs=0.0))  # every step is past the slice: a pause after each
    assert len([r for r in out if r is not None]) == 50
    assert out.count(None) >= 50
    assert None not in list(d.snapshot_records(slice_secs=60.0))
