"""Following sessions turn to turn, and moving one off a pile after an eviction (extproc.sessions)."""

import random

import pytest

from extproc.config import policy_config
from extproc.sessions import SessionBook, apply_note, decide_following, reference, report
from extproc.tree import RadixTree

CFG = policy_config()  # --cache-threshold 0.3
SYSTEM = "You are an agent with these tools. " * 12  # 420 characters every session shares
P = "m"


def turn1(user: str) -> str:
    return SYSTEM + user


class Fleet:
    """Two upstreams; sessions on one shared system prompt, two already stored on ``a`` (the first
    begins the prefix, the second's match still runs into the one chain stored), so a third one
    stops where they branch: a new session over the threshold on the shared prefix alone."""

    def __init__(self, family_turns: float = 2.0) -> None:
        self.tree = RadixTree()
        self.book = SessionBook(CFG.cache_threshold, family_turns)
        self.rng = random.Random(1)
        for user in ("first task " * 30, "second task " * 30):
            self.send(turn1(user))

    def send(self, text: str, loads: dict[str, int] | None = None):
        d, session, moved = decide_following(self.book, self.tree, loads or {"a": 0, "b": 0}, P, text, CFG, self.rng)
        self.tree.insert(P, text, d.upstream, 0.0)
        return d, session, moved


def evict(session) -> None:
    """Its latest turn's response reported its history evicted."""
    report(session, session.turns, evicted=True)


def test_a_session_is_followed_by_its_prompts_and_counted_per_shared_prefix():
    f = Fleet()
    t1 = turn1("third task " * 30)
    d, s, moved = f.send(t1)
    assert d.upstream == "a" and s is not None and not moved
    assert s.over and s.shared == len(SYSTEM) and f.book.family_turns_so_far(s) == 1 and s.turns == 1
    kept = f.book.kept
    d2, s2, _ = f.send(t1 + " reply. next step " * 5)  # its next turn extends the whole prompt
    assert s2 is s and s.turns == 2 and f.book.kept == kept
    assert f.book.family_turns_so_far(s) == 2
    assert f.send("x" * 50)[1] is not None  # new: followed
    assert f.send("x" * 50 + " and more")[1] is not None
    # a request extending a prompt the book never saw (another replica's session) is not followed
    f.book.sessions.clear()
    assert f.send("x" * 50 + " and more, later")[1] is None


def test_a_session_moves_once_after_its_history_was_evicted_at_home():
    f = Fleet()
    t1 = turn1("third task " * 30)
    _, s, _ = f.send(t1)
    evict(s)
    t2 = t1 + " step two " * 70  # the shared prefix is now under 0.3 of the prompt
    d, s, moved = f.send(t2)
    assert moved and d.upstream == "b" and d.continuation == "moved" and d.matched == 0
    assert d.reason == "cache_miss"  # named by its own match at the new router: none
    evict(s)
    d, _, moved = f.send(t2 + " step three " * 10)  # once: it stays on its new router
    assert not moved and d.upstream == "b"


def test_no_move_without_each_of_its_conditions():
    def second_turn(fleet: Fleet, evicted: bool, grow: int = 70, user: str = "third task " * 30) -> bool:
        t1 = turn1(user)
        _, s, _ = fleet.send(t1)
        report(s, s.turns, evicted)
        return fleet.send(t1 + " step two " * grow)[2]

    assert second_turn(Fleet(), evicted=True)  # the case that moves
    assert not second_turn(Fleet(), evicted=False)  # its history was still there
    assert not second_turn(Fleet(), evicted=True, grow=10)  # the shared prefix still passes the routers' threshold
    assert not second_turn(Fleet(family_turns=3), evicted=True)  # sessions on this prefix run short so far
    # a session that began under the threshold (its own text outweighed the shared prefix) was
    # placed by load inside its router: no pile to leave
    assert not second_turn(Fleet(), evicted=True, user="a long task of its own " * 60)


def test_a_move_goes_nowhere_when_every_upstream_holds_the_history():
    f = Fleet()
    t1 = turn1("third task " * 30)
    _, s, _ = f.send(t1)
    f.tree.insert(P, t1, "b", 0.0)
    evict(s)
    d, _, moved = f.send(t1 + " step two " * 70)
    assert not moved and d.continuation == "home"


def test_an_imbalance_decides_first_and_the_session_may_still_move_later():
    f = Fleet()
    t1 = turn1("third task " * 30)
    _, s, _ = f.send(t1)
    evict(s)
    t2 = t1 + " step two " * 70
    d, s, moved = f.send(t2, loads={"a": 0, "b": 200})  # over --balance-abs-threshold: least loaded
    assert d.reason == "imbalance" and d.upstream == "a" and not moved
    report(s, s.turns, evicted=False)  # turn 2's history was there: the latest report counts
    d, s, moved = f.send(t2 + " step three " * 10)
    assert not moved and d.upstream == "a"
    report(s, 1, evicted=True)  # older than the one counted: ignored
    assert not f.send(t2 + " step three " * 10 + " and four")[2]
    # a report that arrives after its session's next turn was decided still counts for the one after
    report(s, s.turns - 1, evicted=True)
    d, _, moved = f.send(t2 + " step three " * 10 + " and four, five")
    assert moved and d.upstream == "b"


def test_the_outlook_tells_what_following_will_count_and_whether_the_turn_moves_and_changes_nothing():
    """``SessionBook.outlook`` (``prefix-router explain``'s session terms) against what ``follow``
    then does with the same request: the same turn, shared prefix, family mean and move; and the
    book exactly as it was, so a dry run never shifts the next real decision."""
    from dataclasses import astuple

    from extproc.policy import continues

    def state(book: SessionBook):
        return (book.kept, [(k, [astuple(x) for x in v]) for k, v in book.sessions.items()], [(k, list(v)) for k, v in book.families.items()])

    def checked(f: Fleet, text: str):
        m = f.tree.match(P, text)
        before = state(f.book)
        o = f.book.outlook(P, text, m, continues(m, CFG))
        assert state(f.book) == before
        d, s, moved = f.send(text)
        if o is None:
            assert s is None
        else:
            assert s is not None and (o.turn, o.shared, o.over, o.family_turns) == (s.turns, s.shared, s.over, f.book.family_turns_so_far(s))
            assert o.new == (s.turns == 1) and o.moves == moved
        return o, s

    for evicted in (True, False):
        f = Fleet()
        t1 = turn1("third task " * 30)
        o, s = checked(f, t1)
        assert o.new and o.over and not o.moves
        report(s, s.turns, evicted)
        t2 = t1 + " step two " * 70
        o, s = checked(f, t2)
        assert o.moves == evicted and o.evicted == evicted and o.turn == 2
        evict(s)
        o, _ = checked(f, t2 + " step three " * 10)
        assert o.moved == evicted and o.moves == (not evicted)  # a session moves once, at its first eviction past the pile
        assert checked(f, "x" * 50)[0].new  # a session of its own
    f.book.families.clear()  # a family forgotten (the bound): its sessions' mean is counted afresh
    assert checked(f, t2 + " step three " * 10 + " and four")[0].family_turns == 0.0
    f.book.sessions.clear()  # an extension of a prompt the book never saw: not followed
    assert checked(f, t2 + " step three " * 10 + " and four")[0] is None


def test_the_book_is_bounded():
    book = SessionBook(0.3, 2.0, max_sessions=3, max_families=2)
    tree = RadixTree()
    rng = random.Random(0)
    for i in range(10):
        text = f"family {i} " * 20
        d, _, _ = decide_following(book, tree, {"a": 0}, P, text, CFG, rng)
        tree.insert(P, text, d.upstream, 0.0)
    assert book.kept == len(book.sessions) == 3 and len(book.families) == 2


def test_a_peer_names_a_session_by_its_latest_prompt_and_a_late_note_still_finds_it():
    """--sync-url: a note names a session by its latest prompt and anchor (``reference``); a note
    that arrives after the session's next turn names the prompt it left, which the book remembers
    (bounded); a wrong anchor or an unknown prompt finds nothing."""
    f = Fleet()
    first = turn1("third task " * 30)
    s = f.send(first)[1]
    ref = reference(P, first, s)
    assert f.book.find(ref) is s
    assert f.book.find(ref[:3] + ("another anchor",)) is None and f.book.find((P, 5, "never", ref[3])) is None
    second = first + " next step " * 40
    assert f.send(second)[1] is s  # its next turn: kept under the new prompt
    assert f.book.find(reference(P, second, s)) is s and f.book.find(ref) is s  # the old name still finds it
    assert apply_note(f.book, ref, "evicted") and s.evicted and s.reported == s.turns  # as its latest turn's report
    assert apply_note(f.book, ref, "cached") and not s.evicted
    assert apply_note(f.book, ref, "moved") and s.moved
    assert not apply_note(f.book, (P, 5, "never", ref[3]), "moved")
    book, tree, rng = SessionBook(0.3, 2.0, max_left=2), RadixTree(), random.Random(0)
    for i in range(6):  # six sessions, each one turn on: six prompts left, two remembered
        for text in (f"session {i} " * 20, f"session {i} " * 20 + "and on " * 10):
            d, _, _ = decide_following(book, tree, {"a": 0}, P, text, CFG, rng)
            tree.insert(P, text, d.upstream, 0.0)
    assert len(book.left) == 2


def test_a_late_note_finds_its_session_among_many_agents_replaying_one_script_in_step():
    """Agents replaying one script on different tasks (bench.e2e's SWE-agent case: 12 copies of one
    trajectory started together) leave prompts of one key together. A report read on another
    replica reaches this one after all of them took their next step: its note must still find its
    own session. (The book kept 4 sessions a prompt: the notes of the first 6 of 10 found none,
    counted as unknown, and a peer could move a session twice.)"""
    f = Fleet()
    script = " the same step of the same script " * 40
    tasks = [f"[task {i}]" for i in range(10)]  # one length: one key per step for all ten
    refs = [reference(P, turn1(t + script), f.send(turn1(t + script))[1]) for t in tasks]
    sessions = [f.send(turn1(t + script) + " step two " * 10)[1] for t in tasks]  # every one steps on before any note
    assert len({id(s) for s in sessions}) == 10
    for ref, s in zip(refs, sessions):
        assert f.book.find(ref) is s
        assert apply_note(f.book, ref, "moved") and s.moved


def test_the_prompts_sessions_left_are_bounded_in_sessions_however_many_share_a_prompt():
    """The late-note memory holds at most ``max_left`` sessions in all, the newest kept: many
    agents on one prompt cannot grow it past the bound, nor push out the latest to leave."""
    book, tree, rng = SessionBook(0.3, 2.0, max_left=3), RadixTree(), random.Random(0)
    script = " the same step of the same script " * 40
    refs = []
    for i in range(8):
        first = f"[task {i}]" + script
        for t in (first, first + " step two " * 10):
            d, s, _ = decide_following(book, tree, {"a": 0}, P, t, CFG, rng)
            tree.insert(P, t, d.upstream, 0.0)
            if t == first:
                refs.append((reference(P, first, s), s))
    assert sum(len(b) for b in book.left.values()) == book.left_kept == 3
    assert [book.find(ref) is s for ref, s in refs] == [False] * 5 + [True] * 3


def test_sessions_replaying_one_script_apart_from_their_first_words_are_kept_apart():
    """Agents on the same steps of different tasks: prompts of one length ending alike."""
    f = Fleet()
    script = " the same step of the same script " * 40
    first = [f.send(turn1(task + script))[1] for task in ("[task 1]", "[task 2]")]
    then = [f.send(turn1(task + script) + " step two " * 10)[1] for task in ("[task 2]", "[task 1]")][::-1]
    assert then == first and then[0] is not then[1]  # each found its own session
    assert [s.turns for s in then] == [2, 2]


@pytest.mark.parametrize("family_turns, step", [(5.0, " output of the step " * 20), (2.0, " " + "w" * 99)])
def test_the_responses_worth_reading_are_a_candidates_and_the_turn_before_it(family_turns, step):
    """``worth_reading`` names the turns whose report may move the session at its next decision: a
    candidate's, and the turn before a session becomes one (its prompt grown by its mean growth so
    far, its family's mean by a turn), so the move is not a turn late; none once it has moved, none
    of a session not begun on a pile. (Its family's turns decide when it becomes a candidate with
    400 characters a turn, its prompt's length with 100.)"""
    f = Fleet(family_turns=family_turns)
    text = turn1("third task " * 30)  # 750 characters, 420 of them shared: over 0.3
    _, s, _ = f.send(text)
    book, seen = f.book, []
    for _ in range(8):
        text += step
        f.send(text)
        seen.append((book.candidate(s, len(text)), book.worth_reading(s, len(text))))
    first = next(i for i, (c, _) in enumerate(seen) if c)
    assert first >= 3 and seen[first - 1] == (False, True)  # read the turn before it is a candidate
    assert all(w for c, w in seen if c) and not any(w for _, w in seen[: first - 1])
    s.moved = True
    assert not book.worth_reading(s, len(text) * 2)
    short = f.send("a question of my own " * 20)[1]  # no shared prefix: not a pile
    assert not short.over and not f.book.worth_reading(short, 10_000)
