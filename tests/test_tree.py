"""The radix tree against a brute-force model, plus the cases that matter by hand."""

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from extproc.tree import NODE_CHARS, RadixTree, common_prefix_len


def held_by(tree: RadixTree, tenant: str) -> int:
    """The budget a tenant holds (its nodes' characters plus NODE_CHARS each), by walking the tree."""
    total = 0
    stack = list(tree._roots.values())
    while stack:
        n = stack.pop()
        if tenant in n.tenants:
            total += len(n.text) + NODE_CHARS
        stack.extend(n.children.values())
    return total


def text_held_by(tree: RadixTree, tenant: str) -> int:
    """Only the characters of the nodes a tenant holds."""
    return held_by(tree, tenant) - NODE_CHARS * sum(1 for n in nodes(tree) if tenant in n.tenants)


def nodes(tree: RadixTree):
    stack = list(tree._roots.values())
    while stack:
        n = stack.pop()
        if n.parent is not None:
            yield n
        stack.extend(n.children.values())


def lcp(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def test_common_prefix_len():
    assert common_prefix_len("abcdef", "xxabcxx", 2) == 3
    assert common_prefix_len("abc", "abc", 0) == 3
    assert common_prefix_len("abc", "ab", 0) == 2
    assert common_prefix_len("a" * 1000 + "b", "a" * 1000 + "c", 0) == 1000


def test_match_reports_each_tenant_and_the_creator_first():
    t = RadixTree()
    t.insert("m", "hello world", "A", 1)
    t.insert("m", "hello there", "B", 2)
    t.insert("m", "hello world!", "C", 3)
    m = t.match("m", "hello world, again")
    assert m.matched == len("hello world")
    assert m.deepest == ["A", "C"]
    assert m.tenants == {"A": 11, "B": 6, "C": 11}
    assert t.match("other-model", "hello world").matched == 0


def test_counts_share_nothing_across_tenants_and_split_keeps_counts():
    t = RadixTree()
    t.insert("", "abcdef", "A", 1)
    t.insert("", "abcxyz", "A", 2)
    t.insert("", "abc", "B", 3)
    assert t.tenant_chars() == {"A": 9 + 3 * NODE_CHARS, "B": 3 + NODE_CHARS}  # A: abc, def, xyz; B: abc
    assert t.total_chars() == 9


def test_evict_drops_least_recently_used_leaves_first():
    t = RadixTree()
    t.insert("", "old-branch-xxxxxxxx", "A", 1)
    t.insert("", "new-branch-yyyyyyyy", "A", 5)
    t.evict("A", 19 + NODE_CHARS)  # room for one of the two leaves
    assert t.match("", "new-branch-yyyyyyyy").matched == 19
    assert t.match("", "old-branch-xxxxxxxx").matched <= 1
    assert t.tenant_chars()["A"] == 19 + NODE_CHARS


def test_remove_tenant_keeps_others():
    t = RadixTree()
    t.insert("", "shared prefix A", "A", 1)
    t.insert("", "shared prefix B", "B", 1)
    t.remove_tenant("A")
    assert "A" not in t.tenant_chars()
    m = t.match("", "shared prefix A")
    assert m.deepest == ["B"] and m.matched == len("shared prefix ")
    t.remove_tenant("B")
    assert t.node_count() == 0


def test_many_tiny_nodes_cost_the_budget_their_memory():
    t = RadixTree()
    for i in range(100):
        t.insert("", f"{i:02d}", "A", i)  # "0" and "1".."9" branch: ~110 nodes of 1-2 characters
    assert t.held("A") == held_by(t, "A") >= 100 * NODE_CHARS


def test_a_tenant_at_its_limit_learns_nothing_new():
    t = RadixTree()
    assert t.insert("", "a" * 100, "A", 1, limit=1000)
    assert not t.insert("", "b" * 100, "A", 2, limit=100 + NODE_CHARS)  # already at the limit
    assert t.match("", "b" * 100).matched == 0 and t.held("A") == 100 + NODE_CHARS
    assert t.insert("", "b" * 100, "B", 2, limit=100 + NODE_CHARS)  # another tenant still can


def test_partitions_are_bounded_least_recently_used_first():
    t = RadixTree(max_partitions=2)
    t.insert("m1", "one", "A", 1)
    t.insert("m2", "two", "A", 2)
    t.insert("m1", "one more", "B", 3)  # m1 is now the most recent
    t.insert("m3", "three", "A", 4)  # drops m2
    assert t.partitions() == 2 and t.partitions_dropped == 1
    assert t.match("m2", "two").matched == 0 and t.match("m1", "one").matched == 3
    assert t.held("A") == held_by(t, "A") and t.held("B") == held_by(t, "B")


TEXTS = st.text(alphabet="abc", min_size=1, max_size=8)
TENANTS = st.sampled_from(["A", "B", "C"])
PARTS = st.sampled_from(["", "m2", "m3"])
MAX_PARTITIONS = 2
BUDGETS = st.integers(0, 4 * NODE_CHARS + 12)


class TreeMachine(RuleBasedStateMachine):
    """Random interleavings of insert, match, evict and remove against a list of inserts."""

    def __init__(self):
        super().__init__()
        self.tree = RadixTree(max_partitions=MAX_PARTITIONS)
        self.model: list[tuple[str, str, str, int]] = []  # (partition, text, tenant, time)
        self.recent: list[str] = []  # partitions, least recently inserted into first
        self.evicted: set[str] = set()  # tenants whose exact contents the model no longer knows
        self.clock = 0

    def _insert(self, part, text, tenant):
        """Insert into the tree and the model; a new partition past the bound drops the least
        recently used one from both."""
        self._forget_empty_partitions()  # a sweep may have just emptied one
        self.clock += 1
        self.tree.insert(part, text, tenant, self.clock)
        if part in self.recent:
            self.recent.remove(part)
        elif len(self.recent) == MAX_PARTITIONS:
            gone = self.recent.pop(0)
            self.model = [e for e in self.model if e[0] != gone]
        self.recent.append(part)
        self.model.append((part, text, tenant, self.clock))

    @rule(part=PARTS, text=TEXTS, tenant=TENANTS)
    def insert(self, part, text, tenant):
        self._insert(part, text, tenant)

    @rule(part=PARTS, text=TEXTS)
    def match(self, part, text):
        m = self.tree.match(part, text)
        best: dict[str, int] = {}
        for p, s, t, _ in self.model:
            if p == part:
                best[t] = max(best.get(t, 0), lcp(s, text))
        for t in ("A", "B", "C"):
            want, got = best.get(t, 0), m.tenants.get(t, 0)
            if t in self.evicted:
                assert got <= want
            else:
                assert got == want, (t, got, want)
        if not self.evicted:
            top = max(best.values(), default=0)
            assert m.matched == top
            assert set(m.deepest) == ({t for t, n in best.items() if n == top} if top else set())

    def _forget_empty_partitions(self):
        """The tree drops a partition that eviction or removal emptied; it no longer counts
        towards the bound (every model entry left in it belongs to an evicted tenant)."""
        self.recent = [p for p in self.recent if p in self.tree._roots]

    @rule(tenant=TENANTS, budget=BUDGETS)
    def evict(self, tenant, budget):
        self.tree.evict(tenant, budget)
        assert self.tree.tenant_chars().get(tenant, 0) <= budget
        self.evicted.add(tenant)
        self._forget_empty_partitions()

    @rule(tenant=TENANTS, budget=BUDGETS, steps=st.integers(0, 6), part=PARTS, text=TEXTS, other=TENANTS)
    def evict_in_slices_while_inserting(self, tenant, budget, steps, part, text, other):
        """The sweep is sliced; an insert lands between slices, as a decision would."""
        gen = self.tree.evict_steps(tenant, budget, step=1)
        for _ in range(steps):
            next(gen, None)
        self._insert(part, text, other)
        for _ in gen:
            pass
        self.evicted.add(tenant)
        self._forget_empty_partitions()

    @rule(tenant=TENANTS)
    def remove(self, tenant):
        self.tree.remove_tenant(tenant)
        self.model = [e for e in self.model if e[2] != tenant]
        self.evicted.discard(tenant)
        self._forget_empty_partitions()

    @invariant()
    def counts_match_the_structure(self):
        chars = self.tree.tenant_chars()
        for t in ("A", "B", "C"):
            assert chars.get(t, 0) == held_by(self.tree, t)
            if t not in self.evicted:
                prefixes = {(p, s[:i]) for p, s, tt, _ in self.model if tt == t for i in range(1, len(s) + 1)}
                assert text_held_by(self.tree, t) == len(prefixes)
        assert self.tree.partitions() <= MAX_PARTITIONS

    @invariant()
    def tenants_are_closed_upwards(self):
        stack = list(self.tree._roots.values())
        while stack:
            n = stack.pop()
            for c in n.children.values():
                assert c.parent is n and c.text and n.children[c.text[0]] is c
                if n.parent is not None:
                    assert set(c.tenants) <= set(n.tenants)
                assert c.tenants, "a node without tenants must be unlinked"
                stack.append(c)


TreeMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
test_tree_against_model = TreeMachine.TestCase


def test_sliced_eviction_yields_every_step_and_reports_what_it_removed():
    def tree():
        t = RadixTree()
        for i in range(40):
            t.insert("", f"leaf {i:03d} " + "x" * 20, "A", float(i))
        return t

    t = tree()
    before = t.held("A")
    progress = list(t.evict_steps("A", before // 2, step=1))
    assert len(progress) > 40  # one yield per node visited, then per leaf popped
    assert progress[-1] == before - t.held("A") > 0  # the last value is everything removed
    assert progress == sorted(progress)
    coarse = tree()
    assert len(list(coarse.evict_steps("A", before // 2, step=10_000))) == 1  # only the final report
    assert coarse.held("A") == t.held("A")


def test_a_leaf_used_during_a_sliced_sweep_goes_back_in_line_and_the_sweep_goes_on():
    t = RadixTree()
    for i, name in enumerate(("one", "two", "three")):
        t.insert("", f"{name} " + "y" * 30, "A", float(i + 1))
    one = len("one ") + 30 + NODE_CHARS
    gen = t.evict_steps("A", t.held("A") - 2 * one, step=1)
    for _ in range(4):  # collect the three leaves (and the root's children walk)
        next(gen)
    t.insert("", "one " + "y" * 30, "A", 10.0)  # "one" used again: newest now
    for _ in gen:
        pass
    assert t.match("", "one " + "y" * 30).matched == 34  # kept: it went back in line
    assert t.match("", "two " + "y" * 30).matched < 4 and t.match("", "three " + "y" * 30).matched < 6


def test_leaves_of_equal_age_evict_without_comparing_nodes():
    t = RadixTree()
    for i in range(20):
        t.insert("", f"same time {i:02d}", "A", 5.0)
    t.evict("A", 0)
    assert "A" not in t.tenant_chars() and t.node_count() == 0


def test_node_count_and_stored_characters():
    t = RadixTree()
    for text in ("abc", "abd", "x"):
        t.insert("", text, "A", 1)
    t.insert("p", "abc", "B", 1)
    # two partition roots, then "ab" (split) with "c" and "d", "x", and "abc" in the other partition
    assert t.node_count() == 2 + 5 and t.total_chars() == 2 + 1 + 1 + 1 + 3
