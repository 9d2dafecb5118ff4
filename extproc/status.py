"""What the status page shows (``/`` and ``/status.json`` on the admin listener), and who may see it.

The page is for an operator who looks before reading metrics: the pool with each upstream's health,
in-flight requests and share of the tree, the decisions of the last minutes by upstream and reason
and by what they were to the conversations seen (``policy.SESSION_KINDS``), the replicas and their
sync link, the version and the configuration in force. It is read-only; it still reveals the pool
and the configuration, so it answers only clients in ``--status-allowed-cidrs`` (loopback by
default) and only under a Host that is an address or ``localhost`` (a web page cannot read it
through DNS rebinding).
"""

from __future__ import annotations

import ipaddress
import re
import time
from collections import deque
from typing import Any, Callable

from extproc import __version__
from .config import Config
from .director import Director
from .policy import SESSION_KINDS

# The windows the page shows, in seconds.
WINDOWS = (60, 300, 900)
SAMPLE_SECS = 10.0

_URL_SECRET = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^@/\s]+)@")


class DecisionWindow:
    """Decisions per key (the director's: upstream, reason, session kind) over the last minutes.

    The director keeps running totals (one dict increment per decision, nothing more on the hot
    path); this keeps a sample of them every ``SAMPLE_SECS`` and answers a window as the difference
    between the totals now and the newest sample at least that old. Bounded: the longest window's
    worth of samples. Right after the start a window covers the time since (``span`` says how much).
    """

    def __init__(self, keep_secs: float = max(WINDOWS), every: float = SAMPLE_SECS) -> None:
        self.samples: deque[tuple[float, dict[tuple[str, ...], int]]] = deque(maxlen=int(keep_secs // every) + 2)

    def sample(self, now: float, totals: dict[tuple[str, ...], int]) -> None:
        self.samples.append((now, dict(totals)))

    def since(self, now: float, secs: float, totals: dict[tuple[str, ...], int]) -> tuple[float, dict[tuple[str, ...], int]]:
        """(the span covered in seconds, the decisions in it per key)."""
        base_t, base = now, {}
        for i, (t, s) in enumerate(self.samples):  # oldest first: keep the newest at least ``secs`` old
            if i == 0 or now - t >= secs:
                base_t, base = t, s
            else:
                break
        counts = {k: n - base.get(k, 0) for k, n in totals.items()}
        return now - base_t, {k: n for k, n in counts.items() if n > 0}


def mask(value: Any) -> Any:
    """The configuration as the page shows it: user names and passwords in URLs (``nats://u:p@h``)
    become ``***``. File paths stay (they name where a secret is, not the secret)."""
    if isinstance(value, str):
        return _URL_SECRET.sub(lambda m: m.group("scheme") + "***@", value)
    if isinstance(value, (list, tuple)):
        return [mask(v) for v in value]
    if isinstance(value, dict):
        return {k: mask(v) for k, v in value.items()}
    return value


def refusal(cfg: Config, peer: str | None, host_header: str) -> str | None:
    """Why the status page is refused to this client (``None``: it may see it).

    ``peer``: the client's address; ``host_header``: the Host it asked for."""
    try:
        ip = ipaddress.ip_address((peer or "").split("%", 1)[0])
    except ValueError:
        return "peer"
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if not any(ip in ipaddress.ip_network(c) for c in cfg.status_allowed_cidrs):
        return "peer"
    host = host_header.strip().lower()
    if host.startswith("["):
        host = host[1:].split("]", 1)[0]
    elif host.count(":") == 1:
        host = host.split(":", 1)[0]
    if host == "localhost":
        return None
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return "host"
    return None


def document(
    director: Director,
    cfg: Config,
    window: DecisionWindow,
    sync_state: Callable[[float], dict] | None,
    started: float,
) -> dict:
    """Everything the page shows, as JSON-ready values (``/status.json``)."""
    now = time.monotonic()
    views = director.upstreams()
    tree = director.tree_stats()
    totals = director.decided
    windows = []
    for secs in WINDOWS:
        span, counts = window.since(now, secs, totals)
        by_upstream: dict[str, dict[str, int]] = {}
        sessions = dict.fromkeys(SESSION_KINDS, 0)
        for (upstream, reason, kind), n in counts.items():
            per = by_upstream.setdefault(upstream, {})
            per[reason] = per.get(reason, 0) + n
            sessions[kind] += n
        windows.append({"secs": secs, "span_secs": round(span, 1), "by_upstream": by_upstream, "sessions": sessions})
    # An upstream's characters count what it holds (shared prefixes for each holder, nodes charged),
    # as its budget does: its share is of their sum, not of the tree's distinct characters.
    held = sum(v.tree_characters for v in views)
    observed = director.observed_hits()  # sampled responses (--observe-sample); none: the ratio is None
    # each upstream's own budget: max_tree_size, or less once observed hits cut it (--observe-feedback)
    budgets = {v.address: director.budget(v.address) for v in views}
    return {
        "version": __version__,
        # the threshold the sessions' kinds are counted at (new sessions over it, see SESSION_KINDS)
        "cache_threshold": cfg.cache_threshold,
        "replica": director.replica_id,
        "uptime_secs": round(now - started, 1),
        "upstreams": [
            {
                "address": v.address,
                "healthy": v.healthy,
                "active_ok": v.active_ok,
                "check_failures": v.check_failures,
                "ejected": v.ejected,
                "ejected_secs_left": round(v.ejected_secs_left, 1),
                "inflight": v.inflight,
                "workers": v.workers,  # as its router reported them; 0: not known (counted as one)
                "tree_characters": v.tree_characters,
                "tree_share": v.tree_characters / held if held else 0.0,
                "budget": budgets[v.address],
                "budget_used": v.tree_characters / budgets[v.address],
                "observed_hit_ratio": observed[v.address][0] if v.address in observed else None,
                "observed_responses": observed[v.address][1] if v.address in observed else 0,
            }
            for v in views
        ],
        "tree": {"stored_characters": tree.stored_characters, "nodes": tree.nodes, "max_tree_size": tree.max_tree_size},
        "decisions": windows,
        "sync": sync_state(now) if sync_state is not None else None,
        "config": mask(cfg.as_dict()),
    }
