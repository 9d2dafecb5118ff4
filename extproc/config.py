"""The service's configuration: one table of options, four sources, one validation.

Every option is defined once, as a field of :class:`Config`: its default, its converter (which
validates), its help text and its group. The command line's flags and help, the README's flag table
(:func:`markdown_table`, kept in step by a test) and ``prefix-router config`` are all generated from
that one place.

Precedence: command-line flags over environment (``PREFIX_ROUTER_<NAME>``) over a config file
(``--config``, TOML or YAML, keys spelt like the flags) over defaults. Options marked ``sglang``
share a name with sglang-router 0.3.2's and keep its default (a test reads the installed
sglang-router's own defaults), so that operators can carry settings across layers.
Every error names the flag it concerns, in one line.
"""

from __future__ import annotations

import ipaddress
import math
import os
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, Mapping

import yaml

from .payload import FORMS
from .policy import HIT_CHOICES, TIE_BREAKS, PolicyConfig
from .addresses import AddressError, parse_hostport

ENV_PREFIX = "PREFIX_ROUTER_"


class ConfigError(ValueError):
    """A bad setting; the message names the flag and says what is wrong."""


# -- validators: each takes the raw value (string from flags/env, any type from a file) ----------


def _number(kind: type, lo: float | None = None, hi: float | None = None, lo_open: bool = False) -> Callable[[Any], Any]:
    def conv(v: Any) -> Any:
        if isinstance(v, bool):
            raise ValueError(f"must be a number, got {v!r}")
        try:
            x = kind(v)
        except (TypeError, ValueError):
            raise ValueError(f"must be {'an integer' if kind is int else 'a number'}, got {v!r}") from None
        if kind is float and not math.isfinite(x):
            raise ValueError(f"must be a finite number, got {v!r}")
        if lo is not None and (x <= lo if lo_open else x < lo):
            raise ValueError(f"must be {'>' if lo_open else '>='} {lo}, got {v!r}")
        if hi is not None and x > hi:
            raise ValueError(f"must be <= {hi}, got {v!r}")
        return x

    return conv


def _choice(options: tuple[str, ...]) -> Callable[[Any], str]:
    def conv(v: Any) -> str:
        s = str(v).strip().lower()
        if s not in options:
            raise ValueError(f"must be one of {', '.join(options)}, got {v!r}")
        return s

    return conv


def _listen(v: Any) -> str:
    try:
        parse_hostport(str(v), allow_zero=True)
    except AddressError as exc:
        raise ValueError(str(exc)) from None
    return str(v).strip()


def _hostport(v: Any) -> str:
    try:
        parse_hostport(str(v))
    except AddressError as exc:
        raise ValueError(str(exc)) from None
    return str(v).strip()


def _text(v: Any) -> str:
    return str(v)


def _cidrs(v: Any) -> tuple[str, ...]:
    items = v.split(",") if isinstance(v, str) else list(v) if isinstance(v, (list, tuple)) else None
    if items is None:
        raise ValueError(f"must be a list of networks like 10.0.0.0/8, got {v!r}")
    out = []
    for item in (str(x).strip() for x in items):
        if item:
            try:
                out.append(str(ipaddress.ip_network(item, strict=False)))
            except ValueError:
                raise ValueError(f"{item!r} is not a network like 10.0.0.0/8") from None
    if not out:
        raise ValueError("must name at least one network")
    return tuple(out)


def _upstreams(v: Any) -> tuple[str, ...]:
    items = v.split(",") if isinstance(v, str) else list(v) if isinstance(v, (list, tuple)) else None
    if items is None:
        raise ValueError(f"must be a list of HOST:PORT, got {v!r}")
    out = tuple(_hostport(i) for i in (str(x).strip() for x in items) if i)
    return out


def _header(v: Any) -> str:
    s = str(v).strip().lower()
    if not s or not all(c.isalnum() or c in "-_" for c in s):
        raise ValueError(f"must be an HTTP header name, got {v!r}")
    return s


def _path(v: Any) -> str:
    s = str(v).strip()
    if not s.startswith("/") or any(c.isspace() for c in s):
        raise ValueError(f"must be an absolute URL path like /health, got {v!r}")
    return s


def _path_or_off(v: Any) -> str:
    """An absolute URL path, or empty for off."""
    return _path(v) if str(v).strip() else ""


def _nats_urls(v: Any) -> str:
    urls = [u.strip() for u in str(v).split(",") if u.strip()]
    if not urls:
        raise ValueError("must name a NATS server like nats://127.0.0.1:4222")
    for u in urls:
        scheme, sep, rest = u.partition("://")
        if not sep or scheme not in ("nats", "tls") or not rest:
            raise ValueError(f"{u!r} is not a NATS URL like nats://HOST:PORT or tls://HOST:PORT")
    return ",".join(urls)


def _subject(v: Any) -> str:
    s = str(v).strip()
    if not s or not all(c.isalnum() or c in "-_." for c in s) or s.startswith(".") or s.endswith(".") or ".." in s:
        raise ValueError(f"must be a NATS subject of letters, digits, '-', '_' and '.', got {v!r}")
    return s


def _bool(v: Any) -> bool:
    if isinstance(v, bool):
        return v
    s = str(v).strip().lower()
    if s in ("1", "true", "yes", "on"):
        return True
    if s in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"must be true or false, got {v!r}")


def opt(
    default: Any, convert: Callable[[Any], Any], help: str, group: str, *, metavar: str | None = None, sglang: bool = False,
    compare: bool = True,
) -> Any:
    """A field of :class:`Config` with everything the CLI, the README and validation need."""
    return field(default=default, compare=compare,
                 metadata={"convert": convert, "help": help, "group": group, "metavar": metavar, "sglang": sglang})


SERVICE, SECURITY, HEALTH, POLICY, PAYLOAD, SYNC, LOGS = (
    "service", "security", "upstream health", "policy", "payload", "replicas", "logs")
DAY = 86400.0  # the longest any interval or timeout may be


@dataclass(frozen=True)
class Config:
    grpc_listen: str = opt(
        "127.0.0.1:50051", _listen,
        "where Envoy reaches the service (ext_proc, access log, grpc.health.v1); loopback unless you open it, "
        "and then with --grpc-tls-client-ca (README: Security)", SERVICE, metavar="HOST:PORT",
    )
    grpc_tls_cert: str | None = opt(None, _text, "serve the gRPC port over TLS with this certificate chain (PEM)", SECURITY, metavar="FILE")
    grpc_tls_key: str | None = opt(None, _text, "the private key of --grpc-tls-cert (PEM)", SECURITY, metavar="FILE")
    grpc_tls_client_ca: str | None = opt(
        None, _text, "require a client certificate signed by this CA (PEM) on the gRPC port: only Envoy may steer the service", SECURITY, metavar="FILE"
    )
    grpc_reflection: bool = opt(False, _bool, "serve gRPC server reflection on the gRPC port (off: peers learn nothing they need not)", SECURITY)
    admin_listen: str = opt(
        "127.0.0.1:9464", _listen, "HTTP: the status page (/), /metrics, /healthz, /readyz (read-only)", SERVICE, metavar="HOST:PORT"
    )
    admin_grpc_listen: str = opt(
        "127.0.0.1:9564", _listen, "the admin gRPC API (prefix-router upstreams, explain, tree, config); served only with --admin-token-file",
        SERVICE, metavar="HOST:PORT",
    )
    admin_token_file: str | None = opt(
        None, _text,
        "a file holding the admin API's bearer token; without it the admin gRPC API is off", SECURITY, metavar="FILE",
    )
    status_allowed_cidrs: tuple[str, ...] = opt(
        ("127.0.0.0/8", "::1/128"), _cidrs,
        "the status page (/ on the admin listener; it shows the pool and the configuration) answers only clients in "
        "these networks, whatever --admin-listen is (kubectl port-forward arrives from loopback); /metrics and the "
        "probes answer whoever reaches the listener", SECURITY, metavar="CIDR,...",
    )
    allowed_upstream_cidrs: tuple[str, ...] = opt(
        ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "127.0.0.0/8", "fc00::/7", "::1/128"), _cidrs,
        "upstream addresses must fall in one of these networks, whatever their source (flags, DNS, file, admin API); "
        "link-local, metadata, multicast and unspecified addresses are refused always", SECURITY, metavar="CIDR,...",
    )
    upstreams: tuple[str, ...] = opt(
        (), _upstreams,
        "an SGLang router; repeat for each (or PREFIX_ROUTER_UPSTREAMS=a,b). A name gives all its addresses, "
        "re-resolved every --dns-refresh-secs: the header always carries an IP literal", SERVICE, metavar="HOST:PORT",
    )
    upstreams_file: str | None = opt(None, _text, "a YAML or JSON list of HOST:PORT, re-read when it changes", SERVICE, metavar="FILE")
    dns_refresh_secs: float = opt(30.0, _number(float, 0.0, DAY, lo_open=True), "re-resolve upstream names this often", SERVICE, metavar="S")
    header_name: str = opt("x-upstream-host", _header, "the header Envoy's ORIGINAL_DST cluster reads", SERVICE, metavar="NAME")
    drain_timeout_secs: float = opt(20.0, _number(float, 0.0, DAY), "on SIGTERM, how long streams in flight may take", SERVICE, metavar="S")
    shutdown_delay_secs: float = opt(
        2.0, _number(float, 0.0, DAY),
        "on SIGTERM, keep serving this long while reporting NOT_SERVING, so that Envoy's health check "
        "(every 1 s in the shipped configs) moves new requests away first", SERVICE, metavar="S",
    )
    inflight_timeout_secs: float = opt(
        900.0, _number(float, 0.0, DAY, lo_open=True), "release an in-flight count whose finish report never came after this long", SERVICE, metavar="S"
    )
    lost_report_grace_secs: float = opt(
        30.0, _number(float, 0.0, DAY),
        "when an access-log stream from Envoy ends (a broken connection, an Envoy restart), requests routed "
        "before it and still counted this long after are released: their reports may be lost", SERVICE, metavar="S",
    )
    health_interval_secs: float = opt(
        2.0, _number(float, 0.0, DAY, lo_open=True),
        "GET the health endpoint of each upstream this often (sglang-router's --health-check-interval-secs "
        "is 60: at that pace a recovered router would wait a minute for traffic)", HEALTH, metavar="S",
    )
    health_check_timeout_secs: float = opt(5.0, _number(float, 0.0, DAY, lo_open=True), "timeout of one check", HEALTH, metavar="S", sglang=True)
    health_failure_threshold: int = opt(3, _number(int, 1), "failed checks in a row that take an upstream out", HEALTH, metavar="N", sglang=True)
    health_success_threshold: int = opt(2, _number(int, 1), "good checks in a row that bring it back", HEALTH, metavar="N", sglang=True)
    health_check_endpoint: str = opt("/health", _path, "the path checked", HEALTH, metavar="PATH", sglang=True)
    workers_endpoint: str = opt(
        "/workers", _path_or_off,
        "the path each check also reads the upstream's healthy workers from (sglang-router's worker list), after a good "
        "health check: a router of W workers gets W x --continuation-knee; an upstream that does not answer it counts as "
        "one worker; empty: every upstream counts as one", HEALTH, metavar="PATH",
    )
    ejection_failure_threshold: int = opt(
        3, _number(int, 1, 1000),
        "failed requests in a row (a broken or timed-out stream, or a 502/503/504 from the router itself; never a "
        "503 Envoy made up) that eject an upstream; a refused connection ejects it at once", HEALTH, metavar="N",
    )
    ejection_base_secs: float = opt(
        2.0, _number(float, 0.0, 3600.0), "an ejection lasts this long, doubling on repeats", HEALTH, metavar="S",
    )
    ejection_max_secs: float = opt(60.0, _number(float, 0.0, DAY), "the longest ejection", HEALTH, metavar="S")
    cache_threshold: float = opt(0.3, _number(float, 0.0, 1.0), "a decision counts as a cache hit when the chosen upstream's match / text length is above this", POLICY, metavar="X", sglang=True)
    balance_abs_threshold: int = opt(64, _number(int, 0), "imbalance when max - min in-flight is above this...", POLICY, metavar="N", sglang=True)
    balance_rel_threshold: float = opt(1.5, _number(float, 1.0), "...and max is above min times this: then the least loaded", POLICY, metavar="X", sglang=True)
    eviction_interval_secs: float = opt(60.0, _number(float, 0.0, DAY, lo_open=True), "how often the tree is trimmed to --max-tree-size", POLICY, metavar="S", sglang=True)
    max_tree_size: int = opt(
        67108864, _number(int, 1),
        "characters the tree may hold per upstream, each node counted as 256 more (its memory); enforced as "
        "requests are inserted, and a sweep then trims the upstream to 90% of it", POLICY, metavar="CHARS", sglang=True,
    )
    max_partitions: int = opt(
        1024, _number(int, 1, 1 << 20),
        "distinct (model, lora_path, cache_salt, extra_key) partitions the tree keeps; a new one beyond this drops "
        "the least recently used", POLICY, metavar="N",
    )
    hit_choice: str = opt(
        "cost", _choice(HIT_CHOICES),
        "how a prefix match and load combine: cost (least recompute-plus-queue cost, measured best), "
        "creator (sglang-router's rule) or least_loaded (the least loaded holder of the deepest match)", POLICY, metavar="|".join(HIT_CHOICES),
    )
    inflight_cost_chars: int = opt(
        1024, _number(int, 1),
        "with --hit-choice cost: characters of prefix recompute that one in-flight request beyond the slack is worth", POLICY, metavar="N",
    )
    inflight_slack: int = opt(
        0, _number(int, 0),
        "with --hit-choice cost: requests an upstream may have in flight above the least loaded one at no cost; 3 keeps short "
        "dialogues home but failed the held-out workloads (README, Choosing the defaults)", POLICY, metavar="N",
    )
    continuation_knee: int = opt(
        8, _number(int, 0),
        "with --hit-choice cost: a request that continues an earlier conversation (a next turn, or a turn editing its "
        "history: --continuation-tail) is charged nothing for in-flight requests on the upstreams holding its deepest match "
        "until they have more than this many per worker their router balances (a decode batch's knee, FIELD-NOTES; the "
        "workers as --workers-endpoint reads them, one when unknown: README, Routers of more workers); 0: off (README, "
        "Choosing the defaults)", POLICY, metavar="N",
    )
    continuation_tail: int = opt(
        64, _number(int, 0),
        "with --hit-choice cost: a request whose match runs this many characters or more into one earlier chain of "
        "prompts (a turn that edits, retries or cuts its own history) counts as continuing it too (--continuation-knee); "
        "0: only a request extending a whole earlier prompt does (README, Choosing the defaults)", POLICY, metavar="N",
    )
    tie_break: str = opt("random", _choice(TIE_BREAKS), "among equally good upstreams (sglang-router 0.3.2 takes the first)", POLICY, metavar="|".join(TIE_BREAKS))
    new_prefix_window: int = opt(
        16, _number(int, 0, 1 << 16),
        "with --hit-choice cost: a request of --inflight-cost-chars or more characters that matches no stored text (a new "
        "system prompt, a new document; or a new session with --new-prefix-own-chars of its own past a shared prefix) "
        "is weighed with how many of the last N such requests each upstream took (--new-prefix-weight, "
        "--new-prefix-knee; ties to the fewest), so new prefixes spread over routers' caches, not only over their "
        "loads; 0: off (README, Choosing the defaults)", POLICY, metavar="N",
    )
    new_prefix_weight: int = opt(
        2, _number(int, 0, 1 << 10),
        "with --new-prefix-window: a new prefix is charged this many in-flight requests at an upstream for each new "
        "prefix it took lately beyond the fewest any upstream took (a home draws lasting load and cache use); 0: "
        "ties only", POLICY, metavar="N",
    )
    new_prefix_knee: int = opt(
        3, _number(int, 0, 1 << 10),
        "with --new-prefix-window: a new prefix is charged an upstream's in-flight requests only beyond this many (or "
        "the least loaded's count, if more): a request or two in flight at the moment it arrives says little of "
        "where its home should be; 0: from the least loaded's count", POLICY, metavar="N",
    )
    new_prefix_own_chars: int = opt(
        1024, _number(int, 0, 1 << 30),
        "with --new-prefix-window: a new session (continuing no conversation of its own) that brings this many "
        "characters or more past the stored prefix it shares (a shared system prompt, then a long prompt of its own) "
        "counts as a new prefix too: its own text is a home that later turns follow; 0: only texts matching nothing "
        "stored do (README, Choosing the defaults)", POLICY, metavar="N",
    )
    routing_text: str = opt("sglang", _choice(FORMS), "what the tree matches on: sglang (as sglang-router) or template (ChatML-like)", PAYLOAD, metavar="|".join(FORMS))
    max_routing_chars: int = opt(1 << 20, _number(int, 1), "only this many leading characters of a prompt are matched and stored", PAYLOAD, metavar="N")
    max_body_bytes: int = opt(
        8 * 1024 * 1024, _number(int, 1, 1 << 30),
        "bodies (after decompression) larger than this are routed by load alone; in duplex mode also what one "
        "stream may hold while its body arrives (a 1M-character prompt is 1-4 MiB of JSON)", PAYLOAD, metavar="N",
    )
    max_held_body_bytes: int = opt(
        256 * 1024 * 1024, _number(int, 1, 1 << 40),
        "in duplex mode, the body bytes all streams together may hold while their bodies arrive; past it a new "
        "chunk makes its request be decided by load alone and streamed through", PAYLOAD, metavar="N",
    )
    max_json_containers: int = opt(
        200_000, _number(int, 1),
        "bodies opening more JSON objects and arrays than this (counted by a byte scan, before parsing) are routed "
        "by load alone: parsing stays under ~15 ms of the event loop", PAYLOAD, metavar="N",
    )
    sync_url: str | None = opt(
        None, _nats_urls,
        "share the routing view with the other replicas through this NATS server (nats://HOST:PORT or tls://, "
        "comma-separated for a cluster); none: the service runs alone", SYNC, metavar="URL",
    )
    sync_subject: str = opt("prefix-router", _subject, "the NATS subject prefix the replicas of one deployment share", SYNC, metavar="NAME")
    sync_token_file: str | None = opt(None, _text, "a file holding the NATS token", SYNC, metavar="FILE")
    sync_creds_file: str | None = opt(None, _text, "a NATS credentials file (user JWT and NKEY seed)", SYNC, metavar="FILE")
    sync_nkey_seed_file: str | None = opt(None, _text, "a file holding an NKEY seed to authenticate with", SYNC, metavar="FILE")
    sync_tls_ca: str | None = opt(None, _text, "verify the NATS server's certificate with this CA (PEM)", SYNC, metavar="FILE")
    sync_tls_cert: str | None = opt(None, _text, "a client certificate for NATS (PEM), with --sync-tls-key", SYNC, metavar="FILE")
    sync_tls_key: str | None = opt(None, _text, "the private key of --sync-tls-cert (PEM)", SYNC, metavar="FILE")
    sync_heartbeat_secs: float = opt(1.0, _number(float, 0.01, 60.0), "a replica tells its in-flight counts at least this often", SYNC, metavar="S")
    sync_peer_timeout_secs: float = opt(
        3.0, _number(float, 0.05, 3600.0), "a peer silent this long is dropped with its in-flight counts", SYNC, metavar="S")
    sync_max_pending: int = opt(
        65536, _number(int, 16, 1 << 24),
        "events a replica may hold unsent, and peers' messages it may hold unapplied; more are dropped and counted", SYNC, metavar="N")
    processes: int = opt(
        1, _number(int, 1, 256),
        "serve: start N replicas, each on the next port of every listener (--grpc-listen 50051 gives 50051..50050+N); "
        "they share one view through --sync-url, or through a nats-server started for them", SYNC, metavar="N")
    observe_sample: float = opt(
        0.0, _number(float, 0.0, 1.0),
        "share of requests whose response the service reads for the cache hit the worker reports (cached_tokens): "
        "observed hit ratio per upstream and the tree's prediction error in the metrics and on the status page. Duplex "
        "mode needs envoy/duplex.yaml's pinned_observed route and observing filter; buffered mode, allow_mode_override "
        "(envoy/buffered.yaml); the Kubernetes gateways' objects carry the duplex ones", POLICY, metavar="P",
    )
    observe_feedback: bool = opt(
        False, _bool,
        "with --observe-sample: correct the tree from the sampled reports. When an upstream's workers report under half of a "
        "predicted match of 1,024+ characters, its share of the tree shrinks to 98% of what it holds (its least recently used "
        "entries go); other reports let it grow back 2% each. Off: in the simulator (bench.observed) it moved hit ratio by "
        "-0.4 to +1.3 points", POLICY,
    )
    move_evicted_sessions: bool = opt(
        True, _bool,
        "move a session once to another router when its router's worker evicted its history (its latest response read "
        "reported under half of the predicted match cached), it began over --cache-threshold on a prefix shared with "
        "other sessions (so sglang-router runs them all on one worker), that prefix is now at most the threshold's "
        "share of its prompt, and sessions on that prefix run --move-family-turns turns on average. In duplex mode "
        "the service reads the responses of the turns that meet the other conditions and no others (envoy/duplex.yaml's "
        "pinned_observed route); in buffered mode only those --observe-sample reads (extproc/sessions.py; README, "
        "The sglang-routers behind it). --no-move-evicted-sessions: follow no session, read no response but the sample",
        POLICY,
    )
    move_family_turns: float = opt(
        6.0, _number(float, 1.0),
        "with --move-evicted-sessions: mean turns so far of the sessions sharing a prefix before one of them moves "
        "(long agent loops, not short chats)", POLICY, metavar="N",
    )
    log_level: str = opt("info", _choice(("debug", "info", "warning", "error")), "debug, info, warning or error (debug logs each decision)", LOGS, metavar="LEVEL")
    log_format: str = opt("auto", _choice(("auto", "json", "console")), "json, console, or auto (console on a terminal)", LOGS, metavar="FMT")
    log_prompts: bool = opt(False, _bool, "include routing text in debug logs (off: prompts are private)", LOGS)
    config: str | None = opt(None, _text, "TOML (.toml) or YAML config file", SERVICE, metavar="FILE", compare=False)

    # Settings a reload cannot change (the listeners are bound once, with their credentials).
    FIXED = ("grpc_listen", "admin_listen", "admin_grpc_listen", "grpc_tls_cert", "grpc_tls_key", "grpc_tls_client_ca",
             "grpc_reflection", "admin_token_file", "sync_url", "sync_subject", "sync_token_file", "sync_creds_file",
             "sync_nkey_seed_file", "sync_tls_ca", "sync_tls_cert", "sync_tls_key", "sync_max_pending", "processes")

    def policy(self) -> PolicyConfig:
        return PolicyConfig(
            cache_threshold=self.cache_threshold,
            balance_abs_threshold=self.balance_abs_threshold,
            balance_rel_threshold=self.balance_rel_threshold,
            hit_choice=self.hit_choice,
            tie_break=self.tie_break,
            inflight_cost_chars=self.inflight_cost_chars,
            inflight_slack=self.inflight_slack,
            continuation_knee=self.continuation_knee,
            continuation_tail=self.continuation_tail,
            new_prefix_window=self.new_prefix_window,
            new_prefix_weight=self.new_prefix_weight,
            new_prefix_knee=self.new_prefix_knee,
            new_prefix_own_chars=self.new_prefix_own_chars,
        )

    def parse_options(self) -> dict[str, Any]:
        """The payload parser's keyword arguments under this configuration."""
        return {
            "form": self.routing_text, "max_routing_chars": self.max_routing_chars,
            "max_body_bytes": self.max_body_bytes, "max_json_containers": self.max_json_containers,
        }

    def as_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["upstreams"] = list(self.upstreams)
        return d


DEFAULTS = Config()


def policy_config(**overrides: Any) -> PolicyConfig:
    """The policy under the defaults, with some settings changed (tests and benchmarks)."""
    return replace(DEFAULTS, **overrides).policy()


OPTIONS = {f.name: f for f in fields(Config)}
CONVERTERS: dict[str, Callable[[Any], Any]] = {name: f.metadata["convert"] for name, f in OPTIONS.items()}


def describe_default(name: str) -> str:
    """The default as a person writes it on a command line ('' when there is none)."""
    v = OPTIONS[name].default
    if v is None or v == () or v is False:
        return ""
    if isinstance(v, tuple):
        return ",".join(v)
    if v is True:
        return "on"
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)


def help_text(name: str) -> str:
    f = OPTIONS[name]
    text = f.metadata["help"]
    default = describe_default(name)
    if default:
        text += f" (default {default}{', as sglang-router' if f.metadata['sglang'] else ''})"
    return text.replace("%", "%%")


def markdown_table() -> str:
    """The README's flag table, generated (``python -m extproc.config`` prints it)."""
    rows = ["| flag | default | meaning |", "|---|---|---|"]
    for name, f in OPTIONS.items():
        default = describe_default(name)
        meta = f.metadata
        shared = " Shares sglang-router's name and default." if meta["sglang"] else ""
        metavar = f" {meta['metavar']}" if meta["metavar"] and "|" not in meta["metavar"] else ""
        rows.append(f"| `{flag_name(name)}{metavar}` | {f'`{default}`' if default else ''} | {meta['help']}.{shared} |")
    return "\n".join(rows)


def flag_name(key: str) -> str:
    return "--upstream" if key == "upstreams" else "--" + key.replace("_", "-")


def _convert(key: str, value: Any, source: str) -> Any:
    try:
        return CONVERTERS[key](value)
    except ValueError as exc:
        where = "" if source == "flag" else f" (from {source})"
        raise ConfigError(f"{flag_name(key)}{where}: {exc}") from None


def read_file(path: str) -> dict[str, Any]:
    """A TOML (``.toml``) or YAML (anything else) mapping of option names to values."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise ConfigError(f"--config: cannot read {path!r}: {exc.strerror or exc}") from None
    try:
        data = tomllib.loads(raw.decode()) if p.suffix == ".toml" else yaml.safe_load(raw)
    except (tomllib.TOMLDecodeError, yaml.YAMLError, UnicodeDecodeError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"--config: {path!r} is not valid {'TOML' if p.suffix == '.toml' else 'YAML'}: {first}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"--config: {path!r} must hold a mapping of option names to values")
    out = {}
    for k, v in data.items():
        key = str(k).replace("-", "_")
        key = "upstreams" if key == "upstream" else key
        if key not in CONVERTERS or key == "config":
            raise ConfigError(f"--config: {path!r} has unknown option {k!r}")
        out[key] = v
    return out


def read_env(env: Mapping[str, str]) -> dict[str, Any]:
    out = {}
    for key in CONVERTERS:
        if key == "config":
            continue
        v = env.get(ENV_PREFIX + key.upper())
        if v is not None:
            out[key] = v
    return out


def build(flags: Mapping[str, Any], env: Mapping[str, str] | None = None) -> Config:
    """Merge the four sources; ``flags`` holds only the options given on the command line."""
    env = os.environ if env is None else env
    merged: dict[str, Any] = {}
    path = flags.get("config") or env.get(ENV_PREFIX + "CONFIG")
    if path:
        for k, v in read_file(path).items():
            merged[k] = _convert(k, v, f"config file {path}")
        merged["config"] = path
    for k, v in read_env(env).items():
        merged[k] = _convert(k, v, f"environment {ENV_PREFIX + k.upper()}")
    for k, v in flags.items():
        if v is not None and k != "config":
            merged[k] = _convert(k, v, "flag")
    cfg = Config(**merged)
    _check_together(cfg)
    return cfg


def _check_together(cfg: Config) -> None:
    """Settings that only make sense with others."""
    if bool(cfg.grpc_tls_cert) != bool(cfg.grpc_tls_key):
        raise ConfigError("--grpc-tls-cert and --grpc-tls-key go together")
    if cfg.grpc_tls_client_ca and not cfg.grpc_tls_cert:
        raise ConfigError("--grpc-tls-client-ca needs --grpc-tls-cert and --grpc-tls-key")
    if bool(cfg.sync_tls_cert) != bool(cfg.sync_tls_key):
        raise ConfigError("--sync-tls-cert and --sync-tls-key go together")
    if cfg.sync_peer_timeout_secs <= cfg.sync_heartbeat_secs:
        raise ConfigError("--sync-peer-timeout-secs must be longer than --sync-heartbeat-secs")


README_BEGIN, README_END = "<!-- flags:begin (python -m extproc.config) -->\n", "\n<!-- flags:end -->"


def update_readme(path: str) -> None:
    """Replace the flag table between the README's markers (``make readme``)."""
    text = Path(path).read_text()
    head, rest = text.split(README_BEGIN, 1)
    _, tail = rest.split(README_END, 1)
    Path(path).write_text(head + README_BEGIN + markdown_table() + README_END + tail)


if __name__ == "__main__":
    import sys

    if sys.argv[1:2] == ["--update-readme"]:
        update_readme(sys.argv[2])
    else:
        print(markdown_table())
