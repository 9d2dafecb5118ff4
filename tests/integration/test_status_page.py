"""The status page in a real headless browser (Debian's chromium driven by Playwright), on the
local stack: two synced replicas behind a real Envoy, two sglang-routers."""

import contextlib
import re
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from extproc.dev import browser
from extproc.dev.stack import Ports, Stack, wait_until
from extproc.policy import SESSION_KINDS

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = Stack(
        Ports.free(routers=2, workers_per_router=1, services=2),
        worker_args=["--output-tokens", "4"],
        workdir=Path(tmp_path_factory.mktemp("stack-status")),
    )
    s.start()
    try:
        yield s
    finally:
        s.stop()


@contextlib.contextmanager
def status_page(stack, replica: int = 0):
    """Replica ``replica``'s status page in headless chromium, loaded with its upstreams drawn."""
    with browser.page() as pg:
        pg.goto(stack.service_admin_url(replica) + "/")
        pg.wait_for_selector("#upstreams tbody tr")
        yield pg


def all_decisions(pg) -> int:
    """The 'all' row of the decisions table, longest window (15 minutes: since the stack started)."""
    cells = pg.locator('#reasons tr[data-reason="all"] th.n')
    return int(cells.last.inner_text())


def session_count(pg, kind: str) -> int:
    """One row of the conversations table, longest window."""
    return int(pg.locator(f'#sessions tr[data-kind="{kind}"] td.n').last.inner_text())


def test_the_page_loads_shows_each_upstream_and_replica_and_updates_after_traffic(stack):
    with status_page(stack) as pg:
        rows = pg.locator("#upstreams tbody tr")
        assert sorted(rows.nth(i).get_attribute("data-upstream") for i in range(rows.count())) == sorted(stack.router_addresses)
        for i in range(rows.count()):
            assert rows.nth(i).locator(".state").inner_text() == "healthy"
        assert re.search(r"2 of 2 upstreams healthy", pg.inner_text("#summary"))
        # the other replica, heard through NATS
        pg.wait_for_selector("#peers tbody tr[data-peer]", timeout=10_000)
        # a peer may be heard while the link still warms up (its snapshot loading): the page says
        # "connected" at its next refresh after that (a fresh-clone run once caught it in between).
        # The state word itself: "disconnected: ..." contains "connected" too.
        wait_until(lambda: pg.locator("#sync-state .state").inner_text() == "connected", 15, "the page to show the NATS link connected")
        pg.click("details summary")  # the configuration, folded by default
        assert "--status-allowed-cidrs\t127.0.0.0/8, ::1/128" in pg.inner_text("#config")
        before = all_decisions(pg)

        sent = browser.conversations(stack.base_url, sessions=4, turns=2)

        # Envoy spreads streams over both replicas; this page counts replica 0's decisions, and it
        # refreshes by itself to what replica 0's own metrics say
        decided = stack.service_metric(0, "prefix_router_decisions_total")
        assert 0 < decided - before <= sent
        wait_until(lambda: all_decisions(pg) == decided, 15, "the page to show the new decisions")
        # a second turn follows its first: some cache hits, and the tree holds text for the routers
        wait_until(lambda: pg.locator('#reasons tr[data-reason="cache_hit"]').count() == 1, 10, "cache hits on the page")
        assert any(rows.nth(i).locator("td.n").nth(2).inner_text() != "0" for i in range(rows.count()))
        # the workers each sglang-router reports (one each here), read by the health checks
        wait_until(lambda: [rows.nth(i).locator("td.workers").inner_text() for i in range(rows.count())] == ["1", "1"], 10,
                   "the page to show each router's workers")
        # what those requests were: the kinds add up to the decisions, and match what replica 0 counted
        # of continuing turns and new sessions. (Which replica sees which turn is Envoy's to choose: with
        # streams alternating, one replica can get every second turn, continuing what the other placed.)
        wait_until(lambda: sum(session_count(pg, k) for k in SESSION_KINDS) == decided, 10, "the conversations table to add up")

        def counted(replica: int) -> tuple[float, float]:
            return (stack.service_metric(replica, "prefix_router_continuations_total"),
                    stack.service_metric(replica, "prefix_router_new_session_match_rate_count"))

        continuing, new = counted(0)
        assert session_count(pg, "continues") + session_count(pg, "moved") == continuing
        assert session_count(pg, "new") + session_count(pg, "new_over_threshold") == new
        assert continuing + counted(1)[0] > 0 and new + counted(1)[1] > 0  # the traffic had both kinds
        assert pg.errors == [], pg.errors


def test_the_page_shows_an_upstream_going_down(stack):
    with status_page(stack, 1) as pg:
        stack.kill_router(1)
        try:
            down = f'#upstreams tr[data-upstream="{stack.router_addresses[1]}"] .state'
            wait_until(lambda: "1 of 2 upstreams healthy" in pg.inner_text("#summary"), 30, "the killed router to show as down")
            assert pg.inner_text(down).startswith(("down", "ejected"))
        finally:
            stack.start_router(1)
        wait_until(lambda: pg.inner_text(down) == "healthy", 30, "the router to come back on the page")
        assert pg.errors == [], pg.errors


def test_the_page_says_so_when_the_service_is_gone_and_recovers(stack):
    with status_page(stack) as pg:
        stack.stop_service(0)
        try:
            wait_until(lambda: pg.locator("#error").is_visible(), 10, "the page to say it is not updated")
        finally:
            stack.start_service(0)
        wait_until(lambda: not pg.locator("#error").is_visible(), 15, "the page to recover")
        # the failed fetches are the only errors Chromium reports
        assert all("Failed to load resource" in e or "net::ERR" in e for e in pg.errors), pg.errors


def test_the_status_page_is_refused_under_a_foreign_host(stack):
    req = urllib.request.Request(stack.service_admin_url(0) + "/status.json", headers={"Host": "rebind.attacker.example"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=5)
    assert e.value.code == 403
