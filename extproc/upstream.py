"""One upstream (an SGLang router) and the state machine of its health.

Two signals decide whether it takes traffic: active checks (N failures in a row take it out, M
successes bring it back) and passive ejection (a failure seen on real traffic takes it out at once
for a back-off that doubles on repeats). An ejected upstream returns only on a good active check
once its back-off has passed, so a dead router stays out until the checks take it out for good.
"""

from __future__ import annotations

from dataclasses import dataclass

import orjson

# The most workers one router is believed to balance: a larger count is cut to this, so that a
# router (or whatever answers at its address) cannot make its knee so large that nothing moves off it.
MAX_WORKERS = 256


def healthy_workers(body: bytes) -> int | None:
    """The healthy workers in a router's worker list (sglang-router's ``GET /workers``:
    ``{"workers": [{"url": ..., "is_healthy": true, ...}, ...]}``; an entry that does not say counts
    as healthy), at most ``MAX_WORKERS``; ``None`` when the body is not such a list."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    workers = data.get("workers") if isinstance(data, dict) else None
    if not isinstance(workers, list):
        return None
    return min(MAX_WORKERS, sum(1 for w in workers if isinstance(w, dict) and w.get("is_healthy", True) is not False))


@dataclass(slots=True)
class Upstream:
    address: str
    inflight: int = 0
    active_ok: bool = True  # the active checker's verdict
    failures: int = 0  # consecutive failed active checks
    successes: int = 0  # consecutive good active checks while down
    ejected: bool = False  # passive ejection: out until a good active check after ejected_until
    ejected_until: float = 0.0  # monotonic clock
    ejections: int = 0  # consecutive ejections: the back-off doubles with each
    traffic_failures: int = 0  # consecutive failed requests seen on real traffic

    @property
    def healthy(self) -> bool:
        return self.active_ok and not self.ejected

    def record_check(self, ok: bool, failure_threshold: int, success_threshold: int, now: float) -> bool | None:
        """An active check's result; returns the new state when it changed (True up, False down)."""
        if ok:
            self.failures = 0
            if self.ejected and now >= self.ejected_until:
                self.ejected = False
                if self.active_ok:
                    return True
            if self.active_ok:
                return None
            self.successes += 1
            if self.successes >= success_threshold:
                self.active_ok, self.successes = True, 0
                return True
            return None
        self.successes = 0
        self.failures += 1
        if self.active_ok and self.failures >= failure_threshold:
            self.active_ok = False
            return False
        return None

    def request_failed(self, threshold: int, base: float, cap: float, now: float) -> float:
        """A request failed at this router; the ``threshold``-th in a row ejects it. Returns the
        ejection's length in seconds (0: not ejected now)."""
        self.traffic_failures += 1
        if self.traffic_failures < threshold:
            return 0.0
        return self.eject(base, cap, now)

    def eject(self, base: float, cap: float, now: float) -> float:
        """Passive ejection; returns its length in seconds (0 when already out: failures of
        requests sent before do not extend it)."""
        if self.ejected:
            return 0.0
        self.traffic_failures = 0
        length = min(cap, base * (2 ** self.ejections))
        self.ejections += 1
        self.ejected, self.ejected_until = True, now + length
        return length

    def eject_for(self, seconds: float, now: float) -> bool:
        """A peer replica ejected this router after failures on its traffic: out for as long
        (the same back-off, counted once); False when already out."""
        if self.ejected:
            return False
        self.traffic_failures = 0
        self.ejections += 1
        self.ejected, self.ejected_until = True, now + seconds
        return True

    def succeeded(self) -> None:
        """A request finished well: failures in a row start again from zero, and the next
        ejection from the base back-off."""
        self.traffic_failures = 0
        if self.ejections and not self.ejected:
            self.ejections = 0
