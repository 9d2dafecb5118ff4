"""The sync link: replicas share one routing view through NATS core (``--sync-url``).

What travels (:mod:`extproc.syncwire`): when something happened (at the end of the event-loop turn
for placements, within 2 ms for counts alone), one event with this replica's in-flight counts, the placements it decided (sent after the decision,
never waited for) and the finish reports it received for other replicas' tickets; at least every
``--sync-heartbeat-secs`` an event with the counts alone. Peers apply what they receive; a peer
silent for ``--sync-peer-timeout-secs`` is dropped with its counts.

A replica that starts (or restarts) listens first, buffering events, asks one peer for a snapshot
of its tree, loads it, then applies the buffered placements the snapshot does not hold (sequence
numbers above its watermark): no gap, and no placement counted twice (inserting one again changes
nothing). Until then it routes on its own view: cold, never wrong. A gap in a peer's sequence
numbers (a disconnection, a slow subscriber) is counted and mended the same way, with a snapshot
from that peer. While NATS is unreachable each replica goes on alone, counting what it could not
share; its sequence numbers still advance, so that its peers notice the gap when it returns.

Nothing here blocks a decision: publishing appends to the client's buffer, applying a peer's event
is a few tree inserts, snapshots are cut into slices between which decisions run, and every queue
is bounded (``--sync-max-pending``), with drops counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections import deque

import nats
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from nats.errors import SlowConsumerError

from . import logs, metrics
from .config import Config
from .director import Director
from .replicas import Seen
from .syncwire import Event, SnapshotReader, WireError, compress_records, decode_event, decode_snapshot_header, encode_events, snapshot_header

log = logs.get("prefix_router.sync")

CHUNK_BYTES = 256 * 1024  # one snapshot message; NATS allows 1 MB by default
SNAPSHOT_TIMEOUT_SECS = 120.0  # a whole snapshot (~12 s to serve at the full default budget, bench.sync); then it runs cold
RECORDS_PER_SLICE = 256  # snapshot lines loaded between two turns of the event loop
RETRY_SECS = 1.0
STOP_SECS = 2.0  # per attempt to stop the link's tasks (see SyncLink.stop)
# An event with placements goes out at the end of the event-loop turn that decided them (a peer
# deciding a request of the same group a moment later must know); one with counts and finish
# reports only waits up to this long for more to join it, which halves the messages under load
# (bench.replicas_e2e) at the price of counts 2 ms late (simulated: no measurable loss at 1 ms).
BATCH_SECS = 0.002
# Bytes of peers' events held: by the NATS client before they are applied, and by a starting
# replica while it waits for its snapshot. Past it, events are dropped and counted (and, during a
# warm-up, the peer's snapshot is asked for again afterwards).
MAX_HELD_BYTES = 64 * 1024 * 1024


def connect_options(cfg: Config) -> dict:
    """nats-py's connect() arguments for the configured URL and credentials. Raises OSError when
    a file cannot be read."""
    opts: dict = {"servers": cfg.sync_url.split(",")}
    if cfg.sync_token_file:
        opts["token"] = _read(cfg.sync_token_file, "--sync-token-file").strip()
    if cfg.sync_creds_file:
        _read(cfg.sync_creds_file, "--sync-creds-file")
        opts["user_credentials"] = cfg.sync_creds_file
    if cfg.sync_nkey_seed_file:
        opts["nkeys_seed_str"] = _read(cfg.sync_nkey_seed_file, "--sync-nkey-seed-file").strip()
    if cfg.sync_tls_ca or cfg.sync_tls_cert or any(u.startswith("tls://") for u in opts["servers"]):
        ctx = ssl.create_default_context(cafile=cfg.sync_tls_ca) if cfg.sync_tls_ca else ssl.create_default_context()
        if cfg.sync_tls_cert:
            ctx.load_cert_chain(cfg.sync_tls_cert, cfg.sync_tls_key)
        opts["tls"] = ctx
    return opts


def _held(watermark: dict[str, tuple[int, int]], ev: Event) -> bool:
    """Whether a snapshot with this watermark already holds the event's placements."""
    epoch, seq = watermark.get(ev.replica, (-1, -1))
    return ev.epoch == epoch and ev.seq <= seq


def _read(path: str, flag: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError as exc:
        raise OSError(f"{flag}: cannot read {path}: {exc.strerror}") from None


class SyncLink:
    def __init__(self, director: Director, cfg: Config) -> None:
        self.director = director
        self.cfg = cfg
        self.outbox = director.share()
        self.events_subject = f"{cfg.sync_subject}.events"
        self.seq = 0  # of the last event sent (or lost while disconnected)
        self.nc: Client | None = None
        self.warming = True  # placements of peers are buffered until the first snapshot is in
        self.buffer: deque[Event] = deque(maxlen=cfg.sync_max_pending)
        self.buffer_bytes = 0
        self.snapshot_from: set[str] = set()  # peers whose events were missed: their snapshot is due
        self.warmed = asyncio.Event()
        self.snapshots_loaded = 0
        self._wake = asyncio.Event()
        self._urgent = asyncio.Event()
        self._snapshot_wake = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._serving: set[asyncio.Task] = set()
        self.outbox.wake = self._wake.set
        self.outbox.urgent = self._urgent.set

    def reconfigure(self, cfg: Config) -> None:
        """A reload: the heartbeat and the text limit change; the connection settings do not
        (``Config.FIXED``)."""
        self.cfg = cfg

    @property
    def connected(self) -> bool:
        return self.nc is not None and self.nc.is_connected

    def state(self, now: float) -> dict:
        """The link as the status page shows it: this replica, the link, every peer heard from."""
        d = self.director
        nc = self.nc
        return {
            "replica": d.replica_id,
            "subject": self.cfg.sync_subject,
            "connected": self.connected,
            "server": (nc.connected_url.netloc.rsplit("@", 1)[-1] if nc is not None and nc.connected_url else ""),
            "warming": self.warming,
            "seq": self.seq,
            "snapshots_loaded": self.snapshots_loaded,
            "snapshots_due": sorted(self.snapshot_from),
            "peers": [
                {"replica": r, "seq": p.seq, "heard_secs_ago": round(max(0.0, now - p.seen), 1), "inflight": sum(p.counts.values())}
                for r, p in sorted(d.peers.peers.items())
            ],
            "peers_gone": len(d.peers.gone),
        }

    # -- life ------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start connecting in the background: the service serves at once, alone until NATS answers."""
        connect_options(self.cfg)  # a credentials file that cannot be read stops the start
        metrics.SYNC_WARMING.set(1)
        self._tasks = [asyncio.create_task(t) for t in (self._run(), self._send_forever(), self._heartbeat_forever(), self._snapshots_forever())]

    async def stop(self) -> None:
        """Stop within a bounded time: a task whose cancellation a library loses (Python 3.11's
        ``asyncio.wait_for`` can swallow one that arrives as its inner call completes, which nats-py's
        connect loop hit under load in a test run) is cancelled again, then left behind, never waited
        for forever: a shutdown must not hang on the sync link."""
        tasks = [*self._tasks, *self._serving]
        for t in tasks:
            t.cancel()
        pending = set(tasks)
        for _ in range(2):
            if not pending:
                break
            _, pending = await asyncio.wait(pending, timeout=STOP_SECS)
            for t in pending:
                t.cancel()
        for t in tasks:
            if t.done() and not t.cancelled():
                t.exception()  # retrieved: a task that failed while stopping is not news
        if pending:
            log.warning("sync_stop_incomplete", tasks=len(pending))
        if self.nc is not None and not self.nc.is_closed:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.nc.close(), 2.0)
        metrics.SYNC_CONNECTED.set(0)

    async def _run(self) -> None:
        """Connect (retrying until it works), subscribe, warm up; nats-py reconnects from then on."""
        d = self.director
        # Not connected by then: route alone (a snapshot comes once a peer is heard, see _on_event).
        asyncio.get_running_loop().call_later(self.cfg.sync_heartbeat_secs * 1.5 + 2.0, self._alone)
        while self.nc is None:
            try:
                self.nc = await nats.connect(
                    **connect_options(self.cfg), name=f"prefix-router-{d.replica_id}", no_echo=True,
                    max_reconnect_attempts=-1, reconnect_time_wait=0.5, connect_timeout=2,
                    error_cb=self._on_error, disconnected_cb=self._on_disconnected, reconnected_cb=self._on_reconnected,
                )
            except (NatsError, OSError, asyncio.TimeoutError) as exc:
                log.warning("sync_unreachable", url=self.cfg.sync_url, error=str(exc) or type(exc).__name__, retry_secs=RETRY_SECS)
                await asyncio.sleep(RETRY_SECS)
        limit = self.cfg.sync_max_pending
        await self.nc.subscribe(self.events_subject, cb=self._on_event, pending_msgs_limit=limit, pending_bytes_limit=MAX_HELD_BYTES)
        await self.nc.subscribe(f"{self.cfg.sync_subject}.snapshot.{d.replica_id}", cb=self._on_snapshot_request, pending_msgs_limit=16)
        metrics.SYNC_CONNECTED.set(1)
        log.info("sync_connected", url=self.nc.connected_url.netloc if self.nc.connected_url else self.cfg.sync_url, replica=d.replica_id)
        self._wake.set()  # tell the peers we are here now
        if self.warming:
            await asyncio.sleep(self.cfg.sync_heartbeat_secs * 1.5)  # long enough to hear every live peer
            peers = list(d.peers.peers)
            if peers:
                await self._load_snapshot(peers[0])
            self._finish_warmup()

    def _alone(self) -> None:
        if self.warming and not self.connected:
            log.warning("sync_warmup_skipped", reason="NATS unreachable: routing on this replica's own view")
            self._finish_warmup()

    def _finish_warmup(self) -> None:
        if not self.warming:
            return
        self.warming = False
        self.warmed.set()
        metrics.SYNC_WARMING.set(0)
        while self.buffer:  # those a snapshot held were removed by _load_snapshot
            self.director.learn_from(self.buffer.popleft())
        self.buffer_bytes = 0

    async def _on_error(self, exc: Exception) -> None:
        if isinstance(exc, SlowConsumerError):
            metrics.SYNC_DROPPED.labels("slow_consumer").inc()
            self.snapshot_from.update(self.director.peers.peers)  # something was missed; sequence gaps will say from whom
        else:
            log.warning("sync_error", error=str(exc) or type(exc).__name__)

    async def _on_disconnected(self) -> None:
        metrics.SYNC_CONNECTED.set(0)
        log.warning("sync_disconnected")

    async def _on_reconnected(self) -> None:
        metrics.SYNC_CONNECTED.set(1)
        log.info("sync_reconnected")
        self._wake.set()

    # -- sending ---------------------------------------------------------------------------------

    async def _send_forever(self) -> None:
        """Placements at the end of their event-loop turn, counts within ``BATCH_SECS``: a burst
        of decisions is one message, and no decision waits for it."""
        while True:
            await self._wake.wait()
            if not self._urgent.is_set():  # counts only: wait for more to join, or a placement
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._urgent.wait(), BATCH_SECS)
            await asyncio.sleep(0)  # the rest of this turn's decisions join the message
            self._wake.clear()
            self._urgent.clear()
            await self.send()

    async def send(self) -> int:
        """Send what the outbox holds with the current counts; returns messages sent."""
        placements, finishes, lost, dropped, ejections, sessions, reports = self.outbox.take()
        if dropped:
            metrics.SYNC_DROPPED.labels("outbox").inc(dropped)
        d = self.director
        if not self.connected:
            # Nobody hears it: count the divergence, and let the sequence advance so that peers
            # see a gap (and ask for a snapshot) once the link is back.
            if placements:
                metrics.SYNC_UNSHARED.inc(len(placements))
                self.seq += 1
            return 0
        max_bytes = max(4096, self.nc.max_payload)
        messages = encode_events(d.replica_id, d.epoch, self.seq + 1, d.counts(), placements, finishes, lost, max_bytes, ejections, sessions, reports)
        for data in messages:
            try:
                # appends to the client's buffer, written out by its own flusher task
                await self.nc.publish(self.events_subject, data)
            except NatsError:
                metrics.SYNC_DROPPED.labels("publish").inc()
            metrics.SYNC_BYTES.labels("sent").inc(len(data))
        self.seq += len(messages)
        metrics.SYNC_MESSAGES.labels("sent").inc(len(messages))
        metrics.SYNC_PLACEMENTS.labels("sent").inc(len(placements))
        for n in sessions:
            metrics.SYNC_SESSIONS.labels(n.kind, "sent").inc()
        if reports:
            metrics.SYNC_SESSIONS.labels("forwarded_report", "sent").inc(len(reports))
        return len(messages)

    async def _heartbeat_forever(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.sync_heartbeat_secs)
            self.outbox.changed()
            self._wake.set()
            self.director.expire_peers()
            metrics.SYNC_PEERS.set(len(self.director.peers.peers))

    # -- receiving -------------------------------------------------------------------------------

    async def _on_event(self, msg: Msg) -> None:
        data = msg.data
        metrics.SYNC_MESSAGES.labels("received").inc()
        metrics.SYNC_BYTES.labels("received").inc(len(data))
        try:
            ev = decode_event(data, self.cfg.max_routing_chars)
        except WireError as exc:
            metrics.SYNC_REJECTED.labels(exc.reason).inc()
            return
        d = self.director
        if ev.replica == d.replica_id:
            return
        try:
            seen, missed = d.apply(ev, placements=not self.warming)
        except Exception:  # a bug here must not end the subscription
            metrics.SYNC_REJECTED.labels("apply_failed").inc()
            log.exception("sync_apply_failed", replica=ev.replica)
            return
        if self.warming and seen is not Seen.OLD and (ev.placements or ev.sessions or ev.reports):
            if len(self.buffer) == self.buffer.maxlen or self.buffer_bytes + len(data) > MAX_HELD_BYTES:
                metrics.SYNC_DROPPED.labels("warmup_buffer").inc()
                self.snapshot_from.add(ev.replica)  # its placements are in its snapshot: ask again once warm
                self._snapshot_wake.set()
            else:
                self.buffer.append(ev)
                self.buffer_bytes += len(data)
        if seen is Seen.GAP or (seen is Seen.NEW and ev.seq > 1 and not self.warming):
            # missed events (or a peer with a past we never heard): its snapshot mends the tree
            if missed:
                metrics.SYNC_MISSED.inc(missed)
            log.warning("sync_gap", replica=ev.replica, missed=missed)
            self.snapshot_from.add(ev.replica)
            self._snapshot_wake.set()

    async def _snapshots_forever(self) -> None:
        await self.warmed.wait()
        while True:
            await self._snapshot_wake.wait()
            self._snapshot_wake.clear()
            while self.snapshot_from:
                peer = self.snapshot_from.pop()
                if peer in self.director.peers.peers and self.connected:
                    await self._load_snapshot(peer)

    # -- snapshots -------------------------------------------------------------------------------

    async def _load_snapshot(self, peer: str) -> bool:
        """Ask ``peer`` for its tree and load it; the buffered events it holds are dropped."""
        nc = self.nc
        inbox = nc.new_inbox()
        chunks: asyncio.Queue[Msg] = asyncio.Queue(maxsize=64)
        sub = await nc.subscribe(inbox, cb=chunks.put, pending_msgs_limit=64)
        d = self.director
        reader = SnapshotReader(self.cfg.max_routing_chars * 4 + 8, (self.cfg.max_routing_chars + 64 * 1024) * 4)
        loaded = 0
        try:
            await nc.publish(f"{self.cfg.sync_subject}.snapshot.{peer}", d.replica_id.encode(), reply=inbox)
            async with asyncio.timeout(SNAPSHOT_TIMEOUT_SECS):
                head = await chunks.get()
                watermark = decode_snapshot_header(head.data)
                while True:
                    msg = await chunks.get()
                    if not msg.data:
                        break
                    for i, rec in enumerate(reader.feed(msg.data)):
                        d.load_record(rec)
                        loaded += 1
                        if i % RECORDS_PER_SLICE == RECORDS_PER_SLICE - 1:
                            await asyncio.sleep(0)
        except (TimeoutError, asyncio.TimeoutError, WireError, NatsError) as exc:
            metrics.SYNC_SNAPSHOTS.labels("load", "failed").inc()
            log.warning("snapshot_failed", peer=peer, error=getattr(exc, "reason", None) or type(exc).__name__, records=loaded)
            return False
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        # Buffered events the snapshot already holds are dropped; later ones are applied by the caller.
        self.buffer = deque((ev for ev in self.buffer if not _held(watermark, ev)), maxlen=self.buffer.maxlen)
        self.snapshots_loaded += 1
        metrics.SYNC_SNAPSHOTS.labels("load", "ok").inc()
        log.info("snapshot_loaded", peer=peer, records=loaded, bad_records=reader.bad)
        return True

    async def _on_snapshot_request(self, msg: Msg) -> None:
        if not msg.reply or len(self._serving) >= 2:  # a third request at once waits for its retry
            metrics.SYNC_SNAPSHOTS.labels("serve", "refused").inc()
            return
        task = asyncio.create_task(self._serve_snapshot(msg.reply))
        self._serving.add(task)
        task.add_done_callback(self._serving.discard)

    async def _serve_snapshot(self, reply: str) -> None:
        """Stream the tree to ``reply`` in chunks, walking it in slices between decisions."""
        d = self.director
        nc = self.nc
        watermark = {**d.peers.watermark(), d.replica_id: (d.epoch, self.seq)}
        sent = 0
        try:
            await nc.publish(reply, snapshot_header(d.replica_id, watermark))
            for chunk in compress_records(d.snapshot_records(), CHUNK_BYTES):
                if chunk is None:
                    await asyncio.sleep(0)
                    continue
                await nc.publish(reply, chunk)
                sent += len(chunk)
                await nc.flush()  # paced by the network, not held in memory
            await nc.publish(reply, b"")
            metrics.SYNC_SNAPSHOTS.labels("serve", "ok").inc()
            log.info("snapshot_served", bytes=sent)
        except (NatsError, asyncio.TimeoutError) as exc:
            metrics.SYNC_SNAPSHOTS.labels("serve", "failed").inc()
            log.warning("snapshot_serve_failed", error=str(exc) or type(exc).__name__)
