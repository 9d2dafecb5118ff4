"""What replicas say to each other over the sync subject, and how a receiver checks it.

Two kinds of message, both JSON (orjson: the parser already on the hot path):

- **event** (``k = "ev"``), published by every replica, batched per event-loop turn and at least
  every heartbeat: who sends (``r`` replica id, ``e`` epoch = its start, ``s`` sequence number),
  its whole in-flight count per upstream (``l``: absolute, so a lost message heals at the next one
  and nothing is counted twice), the placements since its last message (``p``: partition,
  upstream, routing text), finish reports it received for other replicas' tickets (``f``),
  whether it lost access-log reports (``x``), and notes on followed sessions (``q``: a session's
  move, or what a read response of its reported, named by its latest prompt's partition, length,
  last characters and the session's anchor; ``--move-evicted-sessions``), which come after the
  placements they name, and the reports of responses read here for requests another replica
  decided (``o``: request id, whether the history was found evicted), for the replica that holds
  the request's session.
- **snapshot**: a replica's tree as lines of ``[partition, text, [[upstream, age_ms], ...]]`` (one
  line per place where an upstream's branch ends), zlib-compressed and cut into chunks that fit a
  NATS message; the first chunk's header carries the watermark, the sequence numbers of every
  replica whose events the tree already holds.

Anything may arrive on a subject (a foreign publisher, a bug, another version): :func:`decode_event`
checks every field's type and bound and raises :class:`WireError` with a reason that the receiver
counts. This module knows nothing of NATS, of the tree or of the director.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass
from typing import Iterable, Iterator

import orjson

VERSION = 1
OUTCOMES = ("ok", "failed", "refused")
REPLICA_ID = re.compile(r"[0-9a-f]{16}")
MAX_UPSTREAMS = 4096  # entries in a count list
MAX_PARTITION = 128  # characters of a partition key (the service's are 32 hex digits or "")
MAX_ADDRESS = 300
MAX_TICKET = 64
MAX_COUNT = 1 << 31
MAX_EJECTION_SECS = 86400.0
NOTE_KINDS = ("evicted", "cached", "moved")  # a report found the history evicted, or cached; the session was moved
MAX_NOTE_TAIL = 1024  # characters of a prompt's end naming it (extproc.sessions.KEY_TAIL)
MAX_NOTE_ANCHOR = 64  # characters of a session's anchor (extproc.sessions.ANCHOR)
MAX_REQUEST_ID = 128  # characters of a forwarded report's request id (Envoy's are 36)


class WireError(ValueError):
    """A message that is not one of ours; ``reason`` is a short label for the metric."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Placement:
    partition: str
    upstream: str
    text: str


@dataclass(frozen=True, slots=True)
class SessionNote:
    """What a replica learnt of a followed session, for its peers' books: ``kind`` (NOTE_KINDS) of
    the session whose latest prompt, of ``end`` characters in ``partition``, ends with ``tail``,
    and which began with ``anchor`` after its shared prefix."""

    partition: str
    end: int
    tail: str
    anchor: str
    kind: str


@dataclass(frozen=True, slots=True)
class Event:
    replica: str
    epoch: int
    seq: int
    counts: dict[str, int]
    placements: tuple[Placement, ...] = ()
    finishes: tuple[tuple[str, str], ...] = ()  # (ticket, outcome)
    lost: bool = False
    ejections: tuple[tuple[str, float], ...] = ()  # (upstream, seconds)
    sessions: tuple[SessionNote, ...] = ()
    reports: tuple[tuple[str, bool], ...] = ()  # (request id, evicted): read here, decided elsewhere


def _head(replica: str, epoch: int, seq: int, counts: dict[str, int], lost: bool) -> bytes:
    head = {"v": VERSION, "k": "ev", "r": replica, "e": epoch, "s": seq, "l": list(counts.items())}
    if lost:
        head["x"] = True
    return orjson.dumps(head)[:-1]  # without its closing brace: lists may follow


def encode_events(
    replica: str, epoch: int, first_seq: int, counts: dict[str, int], placements: list[Placement],
    finishes: list[tuple[str, str]], lost: bool, max_bytes: int, ejections: list[tuple[str, float]] = (),
    sessions: list[SessionNote] = (), reports: list[tuple[str, bool]] = (),
) -> list[bytes]:
    """One or more messages, each at most ``max_bytes``, holding everything given; sequence
    numbers run from ``first_seq``. A placement too long for any message has its text cut to fit:
    a prefix of what an upstream holds is still true of it. Session notes follow the placements,
    in the same message or a later one: a receiver applies a message's placements first."""
    out: list[bytes] = []
    seq = first_seq
    items: list[tuple[str, bytes]] = [("j", orjson.dumps([u, secs])) for u, secs in ejections]
    items += [("f", orjson.dumps([t, o])) for t, o in finishes]
    for p in placements:
        items.append(("p", _placement_bytes(p, max_bytes // 2)))
    items += [("q", orjson.dumps([n.partition, n.end, n.tail, n.anchor, n.kind])) for n in sessions]
    items += [("o", orjson.dumps([rid, evicted])) for rid, evicted in reports]
    budget = max_bytes - len(_head(replica, epoch, seq, counts, lost)) - 64
    batch: dict[str, list[bytes]] = {"p": [], "f": [], "j": [], "q": [], "o": []}
    size = 0

    def flush() -> None:
        nonlocal seq, size, lost
        parts = [_head(replica, epoch, seq, counts, lost)]
        for key in ("p", "f", "j", "q", "o"):
            if batch[key]:
                parts.append(b',"' + key.encode() + b'":[' + b",".join(batch[key]) + b"]")
                batch[key] = []
        out.append(b"".join(parts) + b"}")
        seq += 1
        size = 0
        lost = False

    for key, data in items:
        if size + len(data) + 8 > budget and size:
            flush()
        batch[key].append(data)
        size += len(data) + 1
    if size or not out:
        flush()
    return out


def _placement_bytes(p: Placement, max_bytes: int) -> bytes:
    data = orjson.dumps([p.partition, p.upstream, p.text])
    text = p.text
    while len(data) > max_bytes and text:
        text = text[: len(text) * max_bytes // len(data) - 1]  # each pass at least halves the excess
        data = orjson.dumps([p.partition, p.upstream, text])
    return data


def _str(v: object, limit: int, reason: str) -> str:
    if not isinstance(v, str) or len(v) > limit:
        raise WireError(reason)
    return v


def _int(v: object, lo: int, hi: int, reason: str) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v < hi:
        raise WireError(reason)
    return v


def decode_event(data: bytes, max_text: int) -> Event:
    """Parse and check one event; raises :class:`WireError`. Texts longer than ``max_text``
    (the receiver's ``max_routing_chars``) are refused, not cut: a sender never sends them."""
    try:
        m = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise WireError("not_json") from None
    if not isinstance(m, dict) or m.get("k") != "ev":
        raise WireError("not_an_event")
    if m.get("v") != VERSION:
        raise WireError("version")
    replica = m.get("r")
    if not isinstance(replica, str) or not REPLICA_ID.fullmatch(replica):
        raise WireError("replica_id")
    epoch = _int(m.get("e"), 0, 1 << 63, "epoch")
    seq = _int(m.get("s"), 0, 1 << 63, "seq")
    raw_counts = m.get("l")
    if not isinstance(raw_counts, list) or len(raw_counts) > MAX_UPSTREAMS:
        raise WireError("counts")
    counts: dict[str, int] = {}
    for item in raw_counts:
        if not isinstance(item, list) or len(item) != 2:
            raise WireError("counts")
        counts[_str(item[0], MAX_ADDRESS, "counts")] = _int(item[1], 0, MAX_COUNT, "counts")
    placements = []
    for item in _list(m.get("p"), "placements"):
        if not isinstance(item, list) or len(item) != 3:
            raise WireError("placements")
        placements.append(Placement(
            _str(item[0], MAX_PARTITION, "placements"), _str(item[1], MAX_ADDRESS, "placements"),
            _str(item[2], max_text, "text_too_long"),
        ))
    finishes = []
    for item in _list(m.get("f"), "finishes"):
        if not isinstance(item, list) or len(item) != 2 or item[1] not in OUTCOMES:
            raise WireError("finishes")
        finishes.append((_str(item[0], MAX_TICKET, "finishes"), item[1]))
    ejections = []
    for item in _list(m.get("j"), "ejections"):
        if (not isinstance(item, list) or len(item) != 2 or not isinstance(item[1], (int, float)) or isinstance(item[1], bool)
                or not 0 < item[1] <= MAX_EJECTION_SECS):
            raise WireError("ejections")
        ejections.append((_str(item[0], MAX_ADDRESS, "ejections"), float(item[1])))
    notes = []
    for item in _list(m.get("q"), "sessions"):
        if not isinstance(item, list) or len(item) != 5 or item[4] not in NOTE_KINDS:
            raise WireError("sessions")
        notes.append(SessionNote(_str(item[0], MAX_PARTITION, "sessions"), _int(item[1], 0, max_text + 1, "sessions"),
                                 _str(item[2], MAX_NOTE_TAIL, "sessions"), _str(item[3], MAX_NOTE_ANCHOR, "sessions"), item[4]))
    reports = []
    for item in _list(m.get("o"), "reports"):
        if not isinstance(item, list) or len(item) != 2 or not isinstance(item[1], bool):
            raise WireError("reports")
        reports.append((_str(item[0], MAX_REQUEST_ID, "reports"), item[1]))
    lost = m.get("x", False)
    if not isinstance(lost, bool):
        raise WireError("lost")
    return Event(replica, epoch, seq, counts, tuple(placements), tuple(finishes), lost, tuple(ejections), tuple(notes), tuple(reports))


def _list(v: object, reason: str) -> list:
    if v is None:
        return []
    if not isinstance(v, list):
        raise WireError(reason)
    return v


# -- snapshots -----------------------------------------------------------------------------------

SnapshotRecord = tuple[str, str, list[tuple[str, int]]]  # partition, text, [(upstream, age_ms)]


def snapshot_header(replica: str, watermark: dict[str, tuple[int, int]]) -> bytes:
    return orjson.dumps({"v": VERSION, "k": "snap", "r": replica, "w": {r: list(es) for r, es in watermark.items()}})


def decode_snapshot_header(data: bytes) -> dict[str, tuple[int, int]]:
    """The watermark of a snapshot: replica -> (epoch, last sequence number the tree holds)."""
    try:
        m = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise WireError("not_json") from None
    if not isinstance(m, dict) or m.get("k") != "snap" or m.get("v") != VERSION:
        raise WireError("not_a_snapshot")
    w = m.get("w")
    if not isinstance(w, dict) or len(w) > MAX_UPSTREAMS:
        raise WireError("watermark")
    out = {}
    for r, es in w.items():
        if not REPLICA_ID.fullmatch(r) or not isinstance(es, list) or len(es) != 2:
            raise WireError("watermark")
        out[r] = (_int(es[0], 0, 1 << 63, "watermark"), _int(es[1], 0, 1 << 63, "watermark"))
    return out


def compress_records(records: Iterable[SnapshotRecord | None], chunk_bytes: int) -> Iterator[bytes | None]:
    """zlib-compressed JSON lines, cut into chunks of about ``chunk_bytes``. A ``None`` among the
    records is passed through as a ``None`` (a point where the caller may yield to its loop)."""
    z = zlib.compressobj(6)
    pending = bytearray()
    for rec in records:
        if rec is None:
            yield None
            continue
        pending += z.compress(orjson.dumps(rec) + b"\n")
        while len(pending) >= chunk_bytes:
            yield bytes(pending[:chunk_bytes])
            del pending[:chunk_bytes]
    pending += z.flush()
    while pending:
        yield bytes(pending[:chunk_bytes])
        del pending[:chunk_bytes]


class SnapshotReader:
    """Feeds compressed chunks in, gives checked records out; bounded in what it holds."""

    def __init__(self, max_text: int, max_bytes: int) -> None:
        self.z = zlib.decompressobj()
        self.buf = b""
        self.max_text = max_text
        self.max_bytes = max_bytes  # the longest line accepted: a text at max_text plus its tenants
        self.bad = 0

    def feed(self, chunk: bytes) -> list[SnapshotRecord]:
        try:
            data = self.buf + self.z.decompress(chunk, self.max_bytes)
        except zlib.error:
            raise WireError("snapshot_corrupt") from None
        if self.z.unconsumed_tail:
            raise WireError("snapshot_line_too_long")
        lines = data.split(b"\n")
        self.buf = lines.pop()
        if len(self.buf) > self.max_bytes:
            raise WireError("snapshot_line_too_long")
        out = []
        for line in lines:
            rec = self._record(line)
            if rec is None:
                self.bad += 1
            else:
                out.append(rec)
        return out

    def _record(self, line: bytes) -> SnapshotRecord | None:
        try:
            m = orjson.loads(line)
            partition, text, tenants = m
            if not (isinstance(partition, str) and len(partition) <= MAX_PARTITION and isinstance(text, str)
                    and 0 < len(text) <= self.max_text and isinstance(tenants, list) and len(tenants) <= MAX_UPSTREAMS):
                return None
            out = []
            for t, age in tenants:
                if isinstance(t, str) and len(t) <= MAX_ADDRESS and isinstance(age, int) and 0 <= age < 1 << 40:
                    out.append((t, age))
            return partition, text, out
        except (orjson.JSONDecodeError, TypeError, ValueError):
            return None
