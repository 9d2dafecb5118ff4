"""The pool's three parts: in-flight tickets, each upstream's health state machine, the pool."""

from extproc.inflight import Tickets
from extproc.pool import Pool
from extproc.upstream import Upstream


def test_tickets_count_per_upstream_release_once_and_expire():
    t = Tickets(timeout=10)
    a1 = t.issue("a:1", now=0)
    a2 = t.issue("a:1", now=0)
    b1 = t.issue("b:1", now=5)
    assert len({a1, a2, b1}) == 3
    assert t.counts == {"a:1": 2, "b:1": 1}
    assert t.release(a1) == "a:1" and t.release(a1) is None  # a second report releases nothing
    assert t.release("forged") is None
    assert t.counts == {"a:1": 1, "b:1": 1}
    assert t.expire(now=12) == 1  # a2 is 12 s old, b1 7 s
    assert t.counts == {"b:1": 1} and t.outstanding() == 1
    assert t.expire(now=16) == 1 and t.counts == {} and t.outstanding() == 0


def test_tickets_are_128_random_bits():
    t = Tickets(timeout=10)
    tickets = {t.issue("a:1", now=0) for _ in range(1000)}
    assert len(tickets) == 1000
    # token_urlsafe(16): 16 random bytes, 22 base64url characters; nothing derived from time or pid
    assert all(len(x) == 22 for x in tickets)
    assert len({x[:6] for x in tickets}) > 900


def test_pool_loads_only_healthy_in_registry_order():
    pool = Pool(inflight_timeout=10)
    pool.set_addresses(["b:1", "a:1", "c:1"])
    pool.tickets.issue("a:1", now=0)
    pool.upstreams["c:1"].ejected = True
    assert list(pool.loads().items()) == [("b:1", 0), ("a:1", 1)]
    assert pool.set_addresses(["a:1", "d:1"]) == ["b:1", "c:1"]
    assert pool.loads() == {"a:1": 1, "d:1": 0}  # a:1 kept its state


def test_active_checks_take_out_and_bring_back():
    u = Upstream("a:1")
    assert u.record_check(False, 3, 2, now=0) is None
    assert u.record_check(False, 3, 2, now=0) is None
    assert u.record_check(False, 3, 2, now=0) is False and not u.healthy
    assert u.record_check(True, 3, 2, now=0) is None and not u.healthy
    assert u.record_check(True, 3, 2, now=0) is True and u.healthy
    # a failure between successes starts the count again
    for _ in range(3):
        u.record_check(False, 3, 2, now=0)
    u.record_check(True, 3, 2, now=0)
    u.record_check(False, 3, 2, now=0)
    assert u.record_check(True, 3, 2, now=0) is None and not u.healthy


def test_passive_ejection_backs_off_and_needs_a_good_check():
    u = Upstream("a:1")
    assert u.eject(base=2, cap=5, now=100) == 2
    assert u.eject(base=2, cap=5, now=100.5) == 0  # already out
    assert not u.healthy
    assert u.record_check(True, 3, 2, now=101) is None and not u.healthy  # too early: stays out
    assert u.record_check(True, 3, 2, now=102.1) is True and u.healthy
    assert u.eject(base=2, cap=5, now=200) == 4  # repeated: doubled
    u.record_check(True, 3, 2, now=205)
    assert u.eject(base=2, cap=5, now=300) == 5  # capped
    u.record_check(True, 3, 2, now=306)
    u.succeeded()
    assert u.eject(base=2, cap=5, now=400) == 2  # a success resets the back-off


def test_an_ejected_upstream_that_the_checks_took_out_comes_back_only_through_them():
    u = Upstream("a:1")
    u.eject(base=2, cap=5, now=0)
    for _ in range(3):
        u.record_check(False, 3, 2, now=1)
    assert u.record_check(True, 3, 2, now=10) is None and not u.healthy  # ejection over, checks still down
    assert u.record_check(True, 3, 2, now=10) is True and u.healthy


def test_ejection_needs_failures_in_a_row():
    u = Upstream("a:1")
    assert u.request_failed(3, base=2, cap=5, now=0) == 0
    assert u.request_failed(3, base=2, cap=5, now=0) == 0
    u.succeeded()  # a success in between: the count starts again
    assert u.request_failed(3, base=2, cap=5, now=0) == 0
    assert u.request_failed(3, base=2, cap=5, now=0) == 0
    assert u.healthy
    assert u.request_failed(3, base=2, cap=5, now=0) == 2 and not u.healthy


def test_a_lost_report_stream_releases_the_tickets_at_risk_after_the_grace():
    t = Tickets(timeout=900, grace=30)
    before = t.issue("a:1", now=0)
    t.reports_lost(now=10)
    after = t.issue("a:1", now=11)
    assert t.expire(now=39) == 0  # within the grace: a late report may still come
    assert t.expire(now=41) == 1  # issued before the loss, still open after the grace
    assert t.release(before) is None and t.release(after) == "a:1"
    assert t.expire(now=2000) == 0 and t.outstanding() == 0


def test_ticket_boundaries_are_strict():
    t = Tickets(timeout=10, grace=5)
    a = t.issue("a:1", now=0)
    assert t.expire(now=10) == 0  # exactly the timeout: not yet
    t.reports_lost(now=20)
    b = t.issue("a:1", now=20)  # issued at the very moment of the loss: its report may still come
    assert t.expire(now=25) == 1  # a (too old); the loss is exactly 5 s old: b not yet at risk
    assert t.expire(now=25.1) == 0 and t.release(b) == "a:1" and t.release(a) is None
