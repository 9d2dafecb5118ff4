"""The new prefixes each upstream took lately, for the cost rule's ties (``policy.is_new_prefix``).

Why: a new prefix (a new shared system prompt, a new document) becomes a home that its later
requests follow, so where it lands decides which router's caches must keep it. Load alone cannot
tell two equally loaded routers apart when one already holds several such homes and the other none
(a closed loop's first requests all arrive together: README, "The decision"); this count can. It
is the last ``window`` new prefixes only, so a home long gone stops counting, and memory stays
bounded by the window whatever the traffic.
"""

from __future__ import annotations

from collections import Counter, deque


class NewPrefixes:
    """Which upstream took each of the last ``window`` new prefixes, counted per upstream."""

    def __init__(self, window: int) -> None:
        self.window = window
        self.recent: deque[str] = deque()
        self.counts: Counter[str] = Counter()  # upstream -> new prefixes among ``recent``

    def took(self, upstream: str, new_prefix: bool = True) -> None:
        """``upstream`` took a new prefix (if ``new_prefix``: callers pass a decision's flag as it
        is); the oldest beyond the window stops counting."""
        if self.window <= 0 or not new_prefix:
            return
        self.recent.append(upstream)
        self.counts[upstream] += 1
        while len(self.recent) > self.window:
            gone = self.recent.popleft()
            self.counts[gone] -= 1
            if not self.counts[gone]:
                del self.counts[gone]
