"""Two service replicas behind real Envoy share one view through a real nats-server."""

from __future__ import annotations

import time
import uuid

import orjson
import pytest

from extproc.dev.stack import ENVOY_DIR, Ports, Stack

from .test_faults import Load
from .test_stack import post

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


@pytest.fixture
def stack(tmp_path):
    s = Stack(Ports.free(2, 2, services=2), envoy_config=ENVOY_DIR / "duplex.yaml",
              worker_args=["--token-delay", "0.002"], service_args=["--sync-heartbeat-secs", "0.2", "--sync-peer-timeout-secs", "1"],
              workdir=tmp_path)
    s.start()
    try:
        # both replicas up, connected and warm: each has heard the other
        wait_for(lambda: all(metric(s, i, "prefix_router_sync_peers") == 1 and metric(s, i, "prefix_router_sync_warming") == 0 for i in (0, 1)))
        yield s
    finally:
        s.stop()


def metric(stack: Stack, replica: int, name: str, **labels: str) -> float:
    return stack.service_metric(replica, name, **labels)


def decisions(stack: Stack, replica: int) -> float:
    return metric(stack, replica, "prefix_router_decisions_total")


def wait_for(cond, timeout: float = 10.0) -> None:
    """Until ``cond()``; a listener not up yet (OSError) counts as not yet."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if cond():
                return
        except OSError:
            pass
        assert time.monotonic() < deadline, "not in time"
        time.sleep(0.1)


def turn(stack: Stack, messages: list[dict]) -> tuple[str, int]:
    status, headers, body = post(stack, "/v1/chat/completions", orjson.dumps({"model": "fake-model", "messages": messages}))
    assert status == 200
    reply = orjson.loads(body)
    messages.append(reply["choices"][0]["message"])
    return headers["x-prefix-router-upstream"], reply["usage"]["prompt_tokens_details"]["cached_tokens"]


def test_each_turn_decided_by_another_replica_stays_on_its_router(stack):
    """Turn 1 is decided by one replica, which then leaves (drained); turn 2 by the other; the first
    comes back, warms up from its peer, and decides turn 3 while the other is away."""
    messages = [{"role": "system", "content": "You answer questions about rivers. " * 30},
                {"role": "user", "content": f"{uuid.uuid4()}: which river is longest?"}]
    before = [decisions(stack, i) for i in (0, 1)]
    home, _ = turn(stack, messages)
    first = next(i for i in (0, 1) if decisions(stack, i) > before[i])
    other = 1 - first
    wait_for(lambda: metric(stack, other, "prefix_router_sync_placements_total", direction="received") >= 1)

    assert stack.stop_service(first) == 0
    messages.append({"role": "user", "content": "And the second longest?"})
    n = decisions(stack, other)
    router, cached = turn(stack, messages)
    assert decisions(stack, other) == n + 1  # decided by the replica that never saw turn 1
    assert router == home and cached > 0

    stack.start_service(first)
    wait_for(lambda: metric(stack, first, "prefix_router_sync_snapshots_total", role="load", result="ok") >= 1)
    assert stack.stop_service(other) == 0
    messages.append({"role": "user", "content": "And the third?"})
    router, cached = turn(stack, messages)
    assert decisions(stack, first) == 1  # the restarted replica decided it, from the snapshot
    assert router == home and cached > 0


def test_nats_killed_under_load_fails_nothing_counts_divergence_and_recovers(stack):
    with Load(stack) as load:
        time.sleep(1.0)
        stack.kill_nats()
        wait_for(lambda: all(metric(stack, i, "prefix_router_sync_connected") == 0 for i in (0, 1)))
        time.sleep(1.5)  # decisions go on, each replica on its own view
        stack.start_nats()
        wait_for(lambda: all(metric(stack, i, "prefix_router_sync_connected") == 1 for i in (0, 1)), timeout=15)
        time.sleep(1.0)
    assert len(load.results) > 30
    assert all(status == 200 for _, status, _ in load.results), [r for r in load.results if r[1] != 200][:5]
    assert sum(metric(stack, i, "prefix_router_sync_unshared_placements_total") for i in (0, 1)) > 0
    # each saw the other's gap once the link was back, and mended its tree with a snapshot
    wait_for(lambda: all(metric(stack, i, "prefix_router_sync_snapshots_total", role="load", result="ok") >= 1 for i in (0, 1)))
    routes = [e["route"] for e in stack.wait_access_log(0, len(load.results))]
    assert set(routes) == {"pinned"}


def test_a_killed_replicas_in_flight_counts_leave_the_other(stack):
    """Requests in flight, decided by both replicas; one replica is killed (no drain, no goodbye):
    the survivor drops the dead one's counts within the peer timeout, and its own requests whose
    reports may have gone down with the dead one's access-log stream within the grace."""
    stack.stop_service(1)
    stack.service_args += ["--lost-report-grace-secs", "2"]
    stack.start_service(1)
    with Load(stack, clients=6):
        wait_for(lambda: metric(stack, 0, "prefix_router_sync_peers") == 1 and metric(stack, 1, "prefix_router_sync_peers") == 1)
        stack.kill_service(0)
        wait_for(lambda: metric(stack, 1, "prefix_router_sync_peers_expired_total") == 1, timeout=5)
    wait_for(lambda: metric(stack, 1, "prefix_router_inflight_requests") == 0, timeout=8)


def test_every_read_response_reaches_the_sessions_book_on_both_replicas(tmp_path):
    """--move-evicted-sessions with replicas, every response read (--observe-sample 1): Envoy opens
    each request's deciding stream and its observing filter's stream to either replica. A replica
    that reads a response it did not decide sends the report on by request id; the deciding one
    counts it for the session and tells its peer's book, which follows the same conversation from
    the placements it hears. Every report reaches both books; none is lost on the way."""
    stack = Stack(Ports.free(2, 2, services=2), envoy_config=ENVOY_DIR / "duplex.yaml", worker_args=["--token-delay", "0.002"],
                  service_args=["--sync-heartbeat-secs", "0.2", "--observe-sample", "1"], workdir=tmp_path)
    stack.start()
    try:
        wait_for(lambda: all(metric(stack, i, "prefix_router_sync_peers") == 1 and metric(stack, i, "prefix_router_sync_warming") == 0 for i in (0, 1)))

        def total(name: str, **labels: str) -> float:
            return sum(metric(stack, i, name, **labels) for i in (0, 1))

        notes = "prefix_router_sync_session_notes_total"
        messages = [{"role": "system", "content": "You are an agent with these tools. " * 40},
                    {"role": "user", "content": f"{uuid.uuid4()}: fix the failing test"}]
        turns = 10
        for k in range(turns):
            turn(stack, messages)
            messages.append({"role": "user", "content": f"tool output {k}: " + "line of output " * 20})
        wait_for(lambda: total("prefix_router_observations_total", result="read") == turns)
        # a response read where it was not decided (Envoy's round robin gives a request's deciding
        # and observing streams to different replicas: every request of every run seen here): sent
        # on, and applied where it was decided
        wait_for(lambda: total(notes, kind="forwarded_report", result="applied") == total(notes, kind="forwarded_report", result="sent"))
        assert total(notes, kind="forwarded_report", result="sent") > 0
        # each report, from wherever it was read, reached the deciding replica's session, then its peer's
        wait_for(lambda: total(notes, kind="cached", result="applied") + total(notes, kind="evicted", result="applied") == turns)
        assert total(notes, kind="cached", result="unknown") + total(notes, kind="evicted", result="unknown") == 0
    finally:
        stack.stop()
