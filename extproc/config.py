"""The service's configuration: one table of options, four sources, one validation.

Precedence: command-line flags over environment (``PREFIX_ROUTER_<NAME>``) over a config file
(``--config``, TOML or YAML, keys spelt like the flags) over defaults. The policy flags keep
sglang-router's names and 0.3.2 defaults so that operators can carry settings across layers.
Every error names the flag it concerns, in one line.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Mapping

import yaml

from .payload import FORMS
from .policy import HIT_CHOICES, TIE_BREAKS, PolicyConfig
from .pool import AddressError, parse_hostport

ENV_PREFIX = "PREFIX_ROUTER_"


class ConfigError(ValueError):
    """A bad setting; the message names the flag and says what is wrong."""


@dataclass(frozen=True)
class Config:
    grpc_listen: str = "0.0.0.0:50051"
    admin_listen: str = "127.0.0.1:9464"
    admin_grpc_listen: str = "127.0.0.1:9465"
    upstreams: tuple[str, ...] = ()
    upstreams_file: str | None = None
    dns_refresh_secs: float = 30.0
    header_name: str = "x-upstream-host"
    cache_threshold: float = 0.3
    balance_abs_threshold: int = 64
    balance_rel_threshold: float = 1.5
    eviction_interval_secs: float = 60.0
    max_tree_size: int = 67108864
    hit_choice: str = "cost"
    inflight_cost_chars: int = 1024
    tie_break: str = "random"
    routing_text: str = "sglang"
    max_routing_chars: int = 1 << 20
    max_body_bytes: int = 64 * 1024 * 1024
    inflight_timeout_secs: float = 900.0
    health_interval_secs: float = 2.0
    health_check_timeout_secs: float = 5.0
    health_failure_threshold: int = 3
    health_success_threshold: int = 2
    health_check_endpoint: str = "/health"
    ejection_base_secs: float = 2.0
    ejection_max_secs: float = 60.0
    drain_timeout_secs: float = 20.0
    shutdown_delay_secs: float = 2.0
    log_level: str = "info"
    log_format: str = "auto"
    log_prompts: bool = False
    config: str | None = field(default=None, compare=False)

    def policy(self) -> PolicyConfig:
        return PolicyConfig(
            cache_threshold=self.cache_threshold,
            balance_abs_threshold=self.balance_abs_threshold,
            balance_rel_threshold=self.balance_rel_threshold,
            hit_choice=self.hit_choice,
            tie_break=self.tie_break,
            inflight_cost_chars=self.inflight_cost_chars,
        )

    # Settings a reload cannot change (the listeners are bound once).
    FIXED = ("grpc_listen", "admin_listen", "admin_grpc_listen")

    def as_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["upstreams"] = list(self.upstreams)
        return d


# -- validators: each takes the raw value (string from flags/env, any type from a file) ----------


def _number(kind: type, lo: float | None = None, hi: float | None = None, lo_open: bool = False) -> Callable[[Any], Any]:
    def conv(v: Any) -> Any:
        if isinstance(v, bool):
            raise ValueError(f"must be a number, got {v!r}")
        try:
            x = kind(v)
        except (TypeError, ValueError):
            raise ValueError(f"must be {'an integer' if kind is int else 'a number'}, got {v!r}") from None
        if kind is float and x != x:
            raise ValueError("must be a number, got NaN")
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


def _bool(v: Any) -> bool:
    if isinstance(v, bool):
        return v
    s = str(v).strip().lower()
    if s in ("1", "true", "yes", "on"):
        return True
    if s in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"must be true or false, got {v!r}")


CONVERTERS: dict[str, Callable[[Any], Any]] = {
    "grpc_listen": _listen,
    "admin_listen": _listen,
    "admin_grpc_listen": _listen,
    "upstreams_file": str,
    "dns_refresh_secs": _number(float, 0.0, lo_open=True),
    "upstreams": _upstreams,
    "header_name": _header,
    "cache_threshold": _number(float, 0.0, 1.0),
    "balance_abs_threshold": _number(int, 0),
    "balance_rel_threshold": _number(float, 1.0),
    "eviction_interval_secs": _number(float, 0.0, lo_open=True),
    "max_tree_size": _number(int, 1),
    "hit_choice": _choice(HIT_CHOICES),
    "inflight_cost_chars": _number(int, 1),
    "tie_break": _choice(TIE_BREAKS),
    "routing_text": _choice(FORMS),
    "max_routing_chars": _number(int, 1),
    "max_body_bytes": _number(int, 1),
    "inflight_timeout_secs": _number(float, 0.0, lo_open=True),
    "health_interval_secs": _number(float, 0.0, lo_open=True),
    "health_check_timeout_secs": _number(float, 0.0, lo_open=True),
    "health_failure_threshold": _number(int, 1),
    "health_success_threshold": _number(int, 1),
    "health_check_endpoint": _path,
    "ejection_base_secs": _number(float, 0.0),
    "ejection_max_secs": _number(float, 0.0),
    "drain_timeout_secs": _number(float, 0.0),
    "shutdown_delay_secs": _number(float, 0.0),
    "log_level": _choice(("debug", "info", "warning", "error")),
    "log_format": _choice(("auto", "json", "console")),
    "log_prompts": _bool,
    "config": str,
}


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
    return Config(**merged)
