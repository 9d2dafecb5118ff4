"""A multi-tenant character radix tree: which upstream has seen which prompt prefixes.

One tree holds every upstream ("tenant"). Each node stores its edge text and, per tenant, the last
time that tenant inserted through it. A tenant present on a node is present on all of its ancestors,
so a tenant's nodes form a connected subtree from the root: matching can report every tenant's own
match length in one walk, and removing a tenant visits only that tenant's nodes.

Partitions (one per model / LoRA / cache salt) are separate roots: texts in different partitions
never match each other. Per-tenant counts span all partitions, since the budget
(``max_tree_size``) bounds the service's memory, not a model's.

What the budget counts is memory, in characters: every node a tenant holds costs its edge text plus
``NODE_CHARS`` for the node itself (its dicts and object headers: ~400 bytes measured, against ~1.5
bytes a stored character), so many tiny edges cannot hold more memory than a few long ones.
The number of partitions is bounded too (``max_partitions``): a new one beyond it drops the least
recently used whole, so that distinct model names or salts cannot grow the tree without limit.

This module knows nothing of gRPC, of load or of policy.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import Iterator

# What one node costs the budget beyond its text, in characters (see the module doc).
NODE_CHARS = 256


class Node:
    """One edge of the tree. ``tenants`` maps tenant → last access time, in insertion order,
    so the first key is the tenant that created the node (what sglang-router routes a hit to)."""

    __slots__ = ("text", "children", "parent", "tenants")

    def __init__(self, text: str, parent: "Node | None", tenants: dict[str, float]) -> None:
        self.text = text
        self.children: dict[str, Node] = {}
        self.parent = parent
        self.tenants = tenants


def common_prefix_len(edge: str, text: str, pos: int) -> int:
    """Length of the common prefix of ``edge`` and ``text[pos:]``, with O(log n) C-level compares.

    A character loop in Python costs ~50 ns a character; ``startswith`` on slices compares at
    memory speed, so a binary search over it keeps long prompts cheap.
    """
    n = min(len(edge), len(text) - pos)
    if text.startswith(edge[:n], pos):
        return n
    lo, hi = 0, n  # invariant: edge[:lo] matches, edge[:hi] does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if text.startswith(edge[lo:mid], pos + lo):
            lo = mid
        else:
            hi = mid
    return lo


@dataclass(slots=True)
class Match:
    """The result of a prefix match.

    ``matched`` is the deepest match over all tenants; ``tenants`` gives each tenant that shares any
    prefix its own matched length; ``deepest`` lists the tenants holding the deepest match, creator
    first. ``whole``: the deepest match ends where a stored text ends and nothing stored goes on
    from there, so this text extends (or repeats) a whole earlier one, as a conversation's next
    turn extends its last prompt; a new session that shares only a system prompt stops inside
    stored texts instead. ``tail``: how many characters the match runs past the last point where
    stored texts branch (a node with two or more children; the root): into one earlier chain of
    texts, each extending the one before, as a conversation's turns do. A turn that edits or cuts
    its own history runs far into its own chain; a new session sharing a system prompt with
    several others stops at their branch (or a few characters past it, by chance).
    """

    matched: int = 0
    tenants: dict[str, int] = field(default_factory=dict)
    deepest: list[str] = field(default_factory=list)
    whole: bool = False
    tail: int = 0


class RadixTree:
    """The character radix tree. Not thread-safe: the service uses it from one event loop."""

    def __init__(self, max_partitions: int = 1 << 30) -> None:
        self._roots: dict[str, Node] = {}  # least recently inserted into first
        self._chars: dict[str, int] = {}
        self.max_partitions = max_partitions
        self.partitions_dropped = 0

    # -- queries ---------------------------------------------------------------------------------

    def tenant_chars(self) -> dict[str, int]:
        """Budget held per tenant: characters plus ``NODE_CHARS`` a node (a node shared by two
        tenants counts for both)."""
        return dict(self._chars)

    def held(self, tenant: str) -> int:
        return self._chars.get(tenant, 0)

    def partitions(self) -> int:
        return len(self._roots)

    def total_chars(self) -> int:
        """Characters actually stored (shared edges counted once)."""
        total = 0
        stack = list(self._roots.values())
        while stack:
            n = stack.pop()
            total += len(n.text)
            stack.extend(n.children.values())
        return total

    def node_count(self) -> int:
        count = 0
        stack = list(self._roots.values())
        while stack:
            n = stack.pop()
            count += 1
            stack.extend(n.children.values())
        return count

    def match(self, partition: str, text: str) -> Match:
        """Longest-prefix match of ``text``; read-only (inserting is what refreshes access times)."""
        result = Match()
        node = self._roots.get(partition)
        if node is None or not text:
            return result
        pos = 0
        lengths = result.tenants
        last: Node | None = None
        branch = 0  # where the last node with two or more children ends
        while pos < len(text):
            child = node.children.get(text[pos])
            if child is None:
                break
            edge = child.text
            # a whole edge matching is the common case (every node above the branch point): one
            # compare, no slice, no call
            k = len(edge) if text.startswith(edge, pos) else common_prefix_len(edge, text, pos)
            pos += k
            for t in child.tenants:
                lengths[t] = pos
            last = child
            if k < len(edge):
                break
            node = child
            if len(child.children) > 1:
                branch = pos
        if last is not None:
            result.matched = pos
            result.deepest = list(last.tenants)
            result.whole = node is last and not last.children
            result.tail = pos - branch
        return result

    # -- updates ---------------------------------------------------------------------------------

    def insert(self, partition: str, text: str, tenant: str, now: float, limit: int | None = None) -> bool:
        """Record that ``tenant`` has (or will soon have) ``text`` cached.

        With ``limit``, a tenant already holding that much learns nothing new (returns False): the
        budget holds as inserts happen, not only at the next eviction sweep.
        """
        if not text or (limit is not None and self._chars.get(tenant, 0) >= limit):
            return False
        roots = self._roots
        node = roots.pop(partition, None)
        if node is None:
            while len(roots) >= self.max_partitions:
                self._drop_partition(next(iter(roots)))
            node = Node("", None, {})
        roots[partition] = node  # most recently used last
        chars = self._chars
        pos = 0
        while pos < len(text):
            first = text[pos]
            child = node.children.get(first)
            if child is None:
                leaf = Node(text[pos:], node, {tenant: now})
                node.children[first] = leaf
                chars[tenant] = chars.get(tenant, 0) + len(leaf.text) + NODE_CHARS
                return True
            edge = child.text
            k = len(edge) if text.startswith(edge, pos) else common_prefix_len(edge, text, pos)
            if k < len(edge):
                child = self._split(node, child, k)
            if tenant not in child.tenants:
                chars[tenant] = chars.get(tenant, 0) + len(child.text) + NODE_CHARS
            child.tenants[tenant] = now
            node = child
            pos += k
        return True

    def _split(self, parent: Node, child: Node, k: int) -> Node:
        """Cut ``child``'s edge after ``k`` characters; the new upper node inherits its tenants,
        each of which now holds one node more."""
        mid = Node(child.text[:k], parent, dict(child.tenants))
        child.text = child.text[k:]
        child.parent = mid
        mid.children[child.text[0]] = child
        parent.children[mid.text[0]] = mid
        chars = self._chars
        for t in mid.tenants:
            chars[t] += NODE_CHARS
        return mid

    def _drop_partition(self, partition: str) -> None:
        """Forget a whole partition, and what each tenant held in it."""
        root = self._roots.pop(partition)
        chars = self._chars
        stack = list(root.children.values())
        while stack:
            n = stack.pop()
            stack.extend(n.children.values())
            n.parent = None  # unlinked: a sliced eviction holding it in its heap skips it
            cost = len(n.text) + NODE_CHARS
            for t in n.tenants:
                chars[t] -= cost
                if not chars[t]:
                    del chars[t]
        self.partitions_dropped += 1

    def remove_tenant(self, tenant: str) -> None:
        """Forget a tenant; visits only the nodes it holds (plus their children's keys)."""
        for partition, root in list(self._roots.items()):
            stack = [c for c in root.children.values() if tenant in c.tenants]
            while stack:
                n = stack.pop()
                stack.extend(c for c in n.children.values() if tenant in c.tenants)
                del n.tenants[tenant]
                if not n.tenants:
                    self._unlink(n)
            if not root.children:
                del self._roots[partition]
        self._chars.pop(tenant, None)

    @staticmethod
    def _unlink(n: Node) -> None:
        parent = n.parent
        if parent is not None and parent.children.get(n.text[0]) is n:
            del parent.children[n.text[0]]
        n.parent = None

    def evict(self, tenant: str, max_chars: int) -> int:
        """Drop ``tenant``'s least-recently-used leaves until it holds at most ``max_chars``.

        Returns the characters removed. Cost: one walk of the tenant's nodes plus a heap pop per
        evicted node. The service runs :meth:`evict_steps` instead, in slices between decisions.
        """
        removed = 0
        for removed in self.evict_steps(tenant, max_chars):
            pass
        return removed

    def evict_steps(self, tenant: str, max_chars: int, step: int = 256) -> Iterator[int]:
        """:meth:`evict` in slices: yields (characters removed so far) after every ``step`` nodes
        visited, so that the caller can let decisions run in between.

        The tree may change between slices (inserts, other evictions): a leaf taken from the heap
        is checked again before it goes, and one touched since it was collected goes back in with
        its new time.
        """
        chars = self._chars
        if chars.get(tenant, 0) <= max_chars:
            return
        heap: list[tuple[float, int, Node]] = []
        seq = 0
        work = 0
        for root in list(self._roots.values()):
            stack = [c for c in root.children.values() if tenant in c.tenants]
            while stack:
                n = stack.pop()
                kids = [c for c in n.children.values() if tenant in c.tenants]
                if kids:
                    stack.extend(kids)
                else:
                    heap.append((n.tenants[tenant], seq, n))
                    seq += 1
                work += 1
                if work % step == 0:
                    yield 0
        heapq.heapify(heap)
        removed = 0
        while heap and chars.get(tenant, 0) > max_chars:
            stamp, _, n = heapq.heappop(heap)
            work += 1
            if work % step == 0:
                yield removed
            when = n.tenants.get(tenant)
            if when is None or not self._linked(n) or any(tenant in c.tenants for c in n.children.values()):
                continue  # gone or no longer a leaf of this tenant since it was collected
            if when != stamp:  # used since: back in the queue at its new place
                heapq.heappush(heap, (when, seq, n))
                seq += 1
                continue
            del n.tenants[tenant]
            removed += len(n.text) + NODE_CHARS
            chars[tenant] -= len(n.text) + NODE_CHARS
            parent = n.parent
            if not n.tenants:
                self._unlink(n)
            if (
                parent is not None
                and parent.parent is not None  # not a partition root
                and tenant in parent.tenants
                and not any(tenant in c.tenants for c in parent.children.values())
            ):
                heapq.heappush(heap, (parent.tenants[tenant], seq, parent))
                seq += 1
        if chars.get(tenant) == 0:
            del chars[tenant]
        for partition in [p for p, r in self._roots.items() if not r.children]:
            del self._roots[partition]
        yield removed

    @staticmethod
    def _linked(n: Node) -> bool:
        parent = n.parent
        return parent is not None and parent.children.get(n.text[0]) is n

    # -- snapshots -------------------------------------------------------------------------------

    def branch_ends(self, step: int = 256) -> Iterator[tuple[str, str, dict[str, float]] | None]:
        """Every place where a tenant's branch ends, as (partition, text from the root, {tenant:
        last access}): inserting these texts for these tenants rebuilds what the tree knows.
        Yields ``None`` after every ``step`` nodes, so that a caller can let decisions run; the
        tree may change in between (what changes is then either in the walk or not, never torn)."""
        work = 0
        for partition, root in list(self._roots.items()):
            stack: list[tuple[Node, str]] = [(c, c.text) for c in root.children.values()]
            while stack:
                n, path = stack.pop()
                if n.parent is None:  # removed since it was stacked
                    continue
                kids = list(n.children.values())
                below: set[str] = set()
                for c in kids:
                    below.update(c.tenants)
                    stack.append((c, path + c.text))
                ends = {t: at for t, at in n.tenants.items() if t not in below}
                if ends:
                    yield partition, path, ends
                work += 1
                if work % step == 0:
                    yield None
