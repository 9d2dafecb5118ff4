"""Conversations followed from turn to turn, to move one off a worker that keeps evicting it.

Why: sglang-router 0.3.2 sends every request whose prefix match passes its ``--cache-threshold``
(0.3) to the worker that first stored that prefix. Sessions that begin with a shared system prompt
longer than the threshold's share of their first prompt therefore all run on one worker of each
router, whose cache then evicts each session's history between its turns, while the router's other
workers idle (README, "The sglang-routers behind it"). This layer cannot pick a worker, but it can
send such a session once to another router at a turn where the shared prompt has fallen under the
threshold's share of its grown prompt: that router places it by load, on a worker of its own.

A move costs the session its history where it was, so it is made only when the history was gone
anyway and there is much left to gain: the session began over the threshold on the shared prefix
alone, its latest reported response found under half of the predicted match cached (the worker
evicted it), and the sessions that began on the same shared prefix have run
``--move-family-turns`` turns on average so far (long agent loops, not two-turn chats, whose move
would rebuild a history for the one turn left). Once per session. The reports come from the
responses of the turns that meet every other condition, or may at the next turn
(``SessionBook.worth_reading``): in duplex mode the director reads those and no others, so the
cost of reading falls on the few sessions that may move, not on every request (in buffered mode
the choice to read comes before the decision, and only ``--observe-sample`` reads).

A session is followed by its prompts alone: a request that extends a whole earlier prompt continues
that prompt's session (``Match.whole``); the book keeps each session under its latest prompt (its
length and last characters, and its own first words after the shared prefix), a bounded number of
them (the least recently continued go first). A turn that edits its history instead is not
followed, and its session is lost to the book. Pure bookkeeping: the director and the simulator
call the same functions.

With replicas (``--sync-url``) Envoy spreads a conversation's turns over them, so each book
follows its peers' placements as it follows its own decisions (:func:`follow_placement`), and
peers tell each other of moves and reports (:func:`apply_note`), naming a session by its latest
prompt (:data:`Ref`, from which each process makes its own key).
"""

from __future__ import annotations

import random
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass

from .newprefixes import NewPrefixes
from .policy import Decision, PolicyConfig, continues, decide, is_new_prefix, least_loaded, outcome
from .tree import Match, RadixTree

# Sessions the book keeps, and shared prefixes ("families") it keeps turn counts for: the least
# recently used go first. ~310 bytes a session: ~20 MB at the bound (measured with tracemalloc:
# 65,536 sessions of 2-3 KB prompts).
MAX_SESSIONS = 65536
MAX_FAMILIES = 4096
# Sessions remembered under the prompt they left (their next turn came), for a peer's late note: a
# report read on one replica often reaches the others after the session's next turn was decided.
# Bounded in sessions, not prompts (as many references as 4,096 prompts of 4 held before): agents
# replaying one script in step leave one prompt together, and a note that comes after all of them
# stepped on must still find its own; up to 64 a prompt, so that a note scans at most 64 anchors.
MAX_LEFT = 16384
LEFT_PER_PROMPT = 64
# A prompt is looked up by its length and its last characters, not by a hash of all of it: hashing
# a 100,000-character prompt twice per request would cost five times the decision itself. Sessions
# replaying one script apart from their first words (agents on the same step of different tasks)
# share that key; each is then told by its anchor, the first characters it did not share.
KEY_TAIL = 1024
ANCHOR = 64


def _key(partition: str, text: str, end: int) -> int:
    """The book's key for the prompt ``text[:end]``."""
    return _key_of(partition, end, text[max(0, end - KEY_TAIL) : end])


def _key_of(partition: str, end: int, tail: str) -> int:
    """The key of a prompt of ``end`` characters ending with ``tail`` (its last ``KEY_TAIL``): what
    peers name a session's latest prompt by (``Ref``); Python's salted ``hash()`` of it is never
    sent, each process makes its own."""
    return hash((partition, end, tail))


Ref = tuple[str, int, str, str]  # (partition, end, tail, anchor): a session by its latest prompt, for peers


@dataclass(slots=True, eq=False)
class Session:
    family: int  # the key of the shared prefix it began with (partition included)
    shared: int  # that prefix's length, characters
    anchor: str  # its own first characters after it
    over: bool  # its first prompt matched over the threshold on that prefix alone
    first: int = 0  # its first prompt's length, characters (how fast its prompt grows: ``SessionBook.worth_reading``)
    turns: int = 1
    moved: bool = False
    evicted: bool = False  # its latest report found under half of the predicted match cached
    reported: int = 0  # the turn that report was for

    def owns(self, text: str) -> bool:
        return text.startswith(self.anchor, self.shared)


@dataclass(frozen=True, slots=True)
class Outlook:
    """What the book would make of a request, counted but not kept: each term of the move for
    ``prefix-router explain``, which must not change what the next real request finds."""

    new: bool  # the request begins a session (it continues nothing)
    turn: int  # its turn in the session, this one counted
    shared: int  # characters of the prefix its session began on, shared with other sessions
    over: bool  # the session began over the threshold on that prefix alone
    family_turns: float  # mean turns of the sessions on that prefix, this one counted
    evicted: bool  # the session's latest report found under half of the predicted match cached
    moved: bool  # the session was moved before (once only)
    moves: bool  # this turn would move it (the decision's other terms permitting)


class SessionBook:
    """Sessions by their latest prompt, and the mean turns of sessions by the prefix they share."""

    def __init__(self, threshold: float, family_turns: float, max_sessions: int = MAX_SESSIONS, max_families: int = MAX_FAMILIES,
                 max_left: int = MAX_LEFT) -> None:
        self.threshold, self.family_turns = threshold, family_turns
        self.max_sessions, self.max_families, self.max_left = max_sessions, max_families, max_left
        # key of a session's latest prompt -> the sessions whose latest prompt has that key
        self.sessions: OrderedDict[int, list[Session]] = OrderedDict()
        self.kept = 0  # sessions in ``sessions``
        self.families: OrderedDict[int, list[int]] = OrderedDict()  # family -> [sessions, turns]
        self.left: OrderedDict[int, list[Session]] = OrderedDict()  # key of a prompt left -> the sessions that left it
        self.left_kept = 0  # sessions in ``left``

    def _known(self, partition: str, text: str, match: Match) -> tuple[int, list[Session] | None, Session | None]:
        """The session whose latest prompt the request extends whole, with its key and bucket."""
        key = _key(partition, text, match.matched)
        bucket = self.sessions.get(key)
        return key, bucket, next((c for c in bucket if c.owns(text)), None) if bucket else None

    def follow(self, partition: str, text: str, match: Match, continuing: bool) -> Session | None:
        """The session a request belongs to, counted one turn more: the one whose latest prompt it
        extends whole, or a new one when the request continues nothing (``continuing``: the
        policy's ``continues``). ``None`` for a continuation the book does not know (an edit of
        its history; a session forgotten or begun on another replica): it is not followed."""
        if match.whole and match.matched:
            key, bucket, s = self._known(partition, text, match)
            if s is not None:
                bucket.remove(s)
                if not bucket:
                    del self.sessions[key]
                self.kept -= 1
                self._left(key, s)
                s.turns += 1
                self._count(s.family, sessions=0)
            return s
        if continuing or not text:
            return None
        shared = match.matched  # a new session's match stops where it branches from the others
        s = Session(_key(partition, text, shared), shared, text[shared : shared + ANCHOR], shared > self.threshold * len(text), len(text))
        self._count(s.family, sessions=1)
        return s

    def _count(self, family: int, sessions: int) -> None:
        stats = self.families.pop(family, None) or [0, 0]
        stats[0] += sessions
        stats[1] += 1
        self.families[family] = stats
        if len(self.families) > self.max_families:
            self.families.popitem(last=False)

    def outlook(self, partition: str, text: str, match: Match, continuing: bool) -> Outlook | None:
        """What ``follow`` would count for this request, and whether this turn would move its
        session, with nothing changed; ``None`` where ``follow`` would follow nothing."""
        if not text:
            return None
        if match.whole and match.matched:
            s = self._known(partition, text, match)[2]
            if s is None:
                return None
            mean = self._mean_after(s.family, sessions=0)
            return Outlook(False, s.turns + 1, s.shared, s.over, mean, s.evicted, s.moved, self._moves(s, len(text), mean))
        if continuing:
            return None
        mean = self._mean_after(_key(partition, text, match.matched), sessions=1)
        return Outlook(True, 1, match.matched, match.matched > self.threshold * len(text), mean, False, False, False)

    def _mean_after(self, family: int, sessions: int) -> float:
        """``family_turns_so_far`` once ``follow`` has counted one more turn (and ``sessions``
        more sessions) of the family; a family the book forgot starts from none."""
        n, turns = self.families.get(family) or (0, 0)
        return (turns + 1) / (n + sessions) if n + sessions else 0.0

    def family_turns_so_far(self, s: Session) -> float:
        stats = self.families.get(s.family)
        return stats[1] / stats[0] if stats and stats[0] else 0.0

    def candidate(self, s: Session, text_len: float, turns_ahead: int = 0) -> bool:
        """Whether the session, at a turn of ``text_len`` characters, is one a report of eviction
        would move (module doc): not moved yet, begun on a pile its router made of the shared
        prefix, now far enough past it, in a family of long sessions (``turns_ahead``: counting
        that many more turns to the family's mean)."""
        return self._candidate(s, text_len, self.family_turns_so_far(s) + turns_ahead)

    def _candidate(self, s: Session, text_len: float, family_mean: float) -> bool:
        return s.over and not s.moved and s.shared <= self.threshold * text_len and family_mean >= self.family_turns

    def worth_reading(self, s: Session, text_len: int) -> bool:
        """Whether this turn's response is worth reading: the session is a candidate at its next
        turn, its prompt grown by its mean growth per turn so far and its family's mean by a turn
        (so also whenever it is one now), a decision this report will inform. The director reads
        no other response for the book; reading only the candidates' own turns would move each
        session a turn late."""
        growth = max(0.0, (text_len - s.first) / (s.turns - 1)) if s.turns > 1 else 0.0
        return self.candidate(s, text_len + growth, turns_ahead=1)

    def should_move(self, s: Session, text_len: int) -> bool:
        """Whether this turn moves the session: a candidate whose latest report found it evicted."""
        return self._moves(s, text_len, self.family_turns_so_far(s))

    def _moves(self, s: Session, text_len: int, family_mean: float) -> bool:
        return s.evicted and self._candidate(s, text_len, family_mean)

    def _left(self, key: int, s: Session) -> None:
        gone = self.left.pop(key, None) or []
        self.left_kept -= len(gone)
        gone.append(s)
        gone = gone[-min(LEFT_PER_PROMPT, self.max_left):]
        self.left[key] = gone  # the newest prompt left, so the bound drops the others first
        self.left_kept += len(gone)
        while self.left_kept > self.max_left:
            _, dropped = self.left.popitem(last=False)
            self.left_kept -= len(dropped)

    def find(self, ref: Ref) -> Session | None:
        """The session a peer names (``ref``): the one the book keeps under that prompt, or, for a
        note that arrives after the session's next turn, the one that left it lately."""
        partition, end, tail, anchor = ref
        key = _key_of(partition, end, tail)
        for bucket in (self.sessions.get(key), self.left.get(key)):
            s = next((c for c in bucket if c.anchor == anchor), None) if bucket else None
            if s is not None:
                return s
        return None

    def keep(self, partition: str, text: str, s: Session) -> None:
        """Keep the session under its latest prompt."""
        key = _key(partition, text, len(text))
        bucket = self.sessions.pop(key, None) or []
        bucket.append(s)
        self.sessions[key] = bucket
        self.kept += 1
        while self.kept > self.max_sessions:
            _, gone = self.sessions.popitem(last=False)
            self.kept -= len(gone)


def report(s: Session, turn: int, evicted: bool) -> bool:
    """What the response of the session's turn ``turn`` reported; whether it counted. The latest
    turn's report counts, even when it arrives after the next turn was decided (a client sends its
    next turn as soon as it has read the response, often before the service has read the same
    response's end): the worker that evicted the history then is the one holding the session
    still. A report older than the one counted is ignored."""
    if turn < s.reported:
        return False
    s.evicted, s.reported = evicted, turn
    return True


def reference(partition: str, text: str, s: Session) -> Ref:
    """How peers find ``s``, kept under its latest prompt ``text`` (:meth:`SessionBook.find`)."""
    return partition, len(text), text[-KEY_TAIL:], s.anchor


def follow_placement(book: SessionBook, tree: RadixTree, partition: str, text: str, cfg: PolicyConfig,
                     match: Match | None = None) -> Session | None:
    """A peer's placement, counted by this book as if this replica had decided it (before the tree
    learns it; ``match``: the text's match in ``tree`` when the caller made it): replicas behind
    one Envoy see a conversation's turns spread over them, and each book must follow the whole
    conversation to know when it may move. The peer's own moves and reports arrive as notes
    (:func:`apply_note`)."""
    if not text:
        return None
    m = match if match is not None else tree.match(partition, text)
    s = book.follow(partition, text, m, continues(m, cfg))
    if s is not None:
        book.keep(partition, text, s)
    return s


def learn_placement(book: SessionBook | None, new_prefixes: NewPrefixes, tree: RadixTree, partition: str, text: str,
                    upstream: str, cfg: PolicyConfig) -> None:
    """A peer's placement on ``upstream``, before ``tree`` learns it: followed by the book (when
    there is one) and counted as a new prefix where it is one, so that every replica spreads new
    prefixes over one count. The tree is matched only when one of the two needs it."""
    if book is None and not (cfg.new_prefix_window and len(text) >= cfg.inflight_cost_chars):
        return
    m = tree.match(partition, text)  # before the insert: what the peer's decision saw
    if book is not None:
        follow_placement(book, tree, partition, text, cfg, m)
    new_prefixes.took(upstream, is_new_prefix(m, len(text), cfg))


def apply_note(book: SessionBook, ref: Ref, kind: str) -> bool:
    """A peer's note on a session (``kind``: ``moved``, or what a read response reported:
    ``evicted`` or ``cached``), as its latest turn's; whether the book found the session."""
    s = book.find(ref)
    if s is None:
        return False
    if kind == "moved":
        s.moved = True
    else:
        report(s, s.turns, kind == "evicted")
    return True


def move(decision: Decision, match: Match, loads: dict[str, int], cache_threshold: float, tie_break: str, rng: random.Random) -> Decision:
    """The decision sent elsewhere: the least loaded upstream holding none of the deepest match
    (where its router places it by load). Unchanged when every upstream holds it."""
    others = {t: n for t, n in loads.items() if t not in match.deepest}
    if not others or not decision.text_len:
        return decision
    choice = least_loaded(others, tie_break, rng)
    own = match.tenants.get(choice, 0)
    return Decision(choice, outcome(own, decision.text_len, cache_threshold), own, decision.text_len, "moved")


def moved_if_due(decision: Decision, due: bool, match: Match, loads: dict[str, int], cfg: PolicyConfig, rng: random.Random) -> Decision:
    """The decision, moved (:func:`move`) when its session is due to move and the load rule did not
    decide it (an imbalance goes first): the one step the service and ``explain`` share."""
    if not due or decision.reason == "imbalance":
        return decision
    return move(decision, match, loads, cfg.cache_threshold, cfg.tie_break, rng)


def decide_following(
    book: SessionBook, tree: RadixTree, loads: dict[str, int], partition: str, text: str, cfg: PolicyConfig, rng: random.Random,
    lately: Mapping[str, int] | None = None, workers: Mapping[str, int] | None = None,
) -> tuple[Decision, Session | None, bool]:
    """The policy's decision (nothing inserted: the caller inserts for the upstream chosen;
    ``lately``, ``workers``: as for ``policy.decide``), moved off a pile when the book says so; the session the
    request belongs to (``None``: none followed), whose ``turns`` its response's report must name
    (:func:`report`); and whether the book moved it."""
    if not text:
        return decide(tree, loads, partition, text, 0.0, cfg, rng, insert=False, workers=workers), None, False
    m = tree.match(partition, text)
    decision = decide(tree, loads, partition, text, 0.0, cfg, rng, insert=False, match=m, lately=lately, workers=workers)
    s = book.follow(partition, text, m, continues(m, cfg))
    if s is None:
        return decision, None, False
    elsewhere = moved_if_due(decision, book.should_move(s, len(text)), m, loads, cfg, rng)
    moved = elsewhere is not decision
    if moved:
        decision, s.moved = elsewhere, True
    book.keep(partition, text, s)
    return decision, s, moved
