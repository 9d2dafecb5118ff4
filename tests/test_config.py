"""Configuration sources, precedence, validation, and the CLI's exit status 2."""

import subprocess
import sys

import pytest

from extproc.config import ConfigError, build
from extproc.discovery import resolve_all
from extproc.pool import AddressError, Pool, parse_hostport


def test_defaults_follow_sglang_router():
    c = build({}, env={})
    assert (c.cache_threshold, c.balance_abs_threshold, c.balance_rel_threshold) == (0.3, 64, 1.5)
    assert (c.eviction_interval_secs, c.max_tree_size) == (60.0, 67108864)
    assert c.grpc_listen == "0.0.0.0:50051" and c.header_name == "x-upstream-host"


def test_precedence_flags_env_file(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('cache-threshold = 0.5\nupstreams = ["127.0.0.1:1"]\nbalance_abs_threshold = 7\n')
    c = build({"config": str(f)}, env={})
    assert (c.cache_threshold, c.upstreams, c.balance_abs_threshold) == (0.5, ("127.0.0.1:1",), 7)
    c = build({"config": str(f)}, env={"PREFIX_ROUTER_CACHE_THRESHOLD": "0.6", "PREFIX_ROUTER_UPSTREAMS": "127.0.0.1:2,127.0.0.1:3"})
    assert c.cache_threshold == 0.6 and c.upstreams == ("127.0.0.1:2", "127.0.0.1:3")
    c = build({"config": str(f), "cache_threshold": "0.7"}, env={"PREFIX_ROUTER_CACHE_THRESHOLD": "0.6"})
    assert c.cache_threshold == 0.7


def test_yaml_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("upstream: [127.0.0.1:5]\nrouting-text: template\n")
    c = build({"config": str(f)}, env={})
    assert c.upstreams == ("127.0.0.1:5",) and c.routing_text == "template"


@pytest.mark.parametrize(
    "flags,needle",
    [
        ({"cache_threshold": "1.5"}, "--cache-threshold"),
        ({"cache_threshold": "abc"}, "--cache-threshold"),
        ({"balance_abs_threshold": "-1"}, "--balance-abs-threshold"),
        ({"balance_rel_threshold": "0.5"}, "--balance-rel-threshold"),
        ({"max_tree_size": "0"}, "--max-tree-size"),
        ({"upstreams": ["nohost"]}, "--upstream"),
        ({"upstreams": ["h:99999"]}, "--upstream"),
        ({"grpc_listen": "x"}, "--grpc-listen"),
        ({"routing_text": "bpe"}, "--routing-text"),
        ({"eviction_interval_secs": "0"}, "--eviction-interval-secs"),
    ],
)
def test_bad_values_name_the_flag(flags, needle):
    with pytest.raises(ConfigError) as e:
        build(flags, env={})
    assert str(e.value).startswith(needle)


def test_unknown_file_key(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("cache_treshold: 0.4\n")
    with pytest.raises(ConfigError, match="unknown option"):
        build({"config": str(f)}, env={})


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "extproc", *args], capture_output=True, text=True, timeout=60, env=env)


def test_cli_bad_value_exits_2_with_one_line():
    r = run_cli("serve", "--upstream", "127.0.0.1:1", "--cache-threshold", "2")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == ["prefix-router: error: --cache-threshold: must be <= 1.0, got '2'"]


def test_cli_unknown_flag_and_missing_upstream_exit_2():
    r = run_cli("serve", "--nope")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    r = run_cli("serve", env={"PATH": "/usr/bin:/bin"})
    assert r.returncode == 2 and "--upstream" in r.stderr


def test_cli_help_and_config():
    r = run_cli("serve", "--help")
    assert r.returncode == 0 and "--cache-threshold" in r.stdout and "PREFIX_ROUTER_UPSTREAMS" in r.stdout
    r = run_cli("config", "--upstream", "127.0.0.1:9")
    assert r.returncode == 0 and '"127.0.0.1:9"' in r.stdout


def test_addresses():
    assert parse_hostport("[::1]:80") == ("::1", 80)
    assert set(resolve_all("localhost:80")) <= {"127.0.0.1:80", "[::1]:80"}
    assert resolve_all("[::1]:80") == ["[::1]:80"]
    with pytest.raises(AddressError):
        resolve_all("no-such-host.invalid:80")


def test_pool_inflight_tickets():
    pool = Pool.from_addresses(["a:1", "b:1"], inflight_timeout=10)
    pool.acquire("t1", "a:1", now=0)
    pool.acquire("t1", "a:1", now=0)  # the same ticket twice counts once
    pool.acquire("t2", "b:1", now=5)
    assert pool.loads() == {"a:1": 1, "b:1": 1}
    assert pool.release("t1") and not pool.release("t1")
    assert pool.expire(now=16) == 1 and pool.loads() == {"a:1": 0, "b:1": 0}
    pool.acquire("t3", "zzz:1")  # not in the pool: ignored
    assert pool.outstanding() == 0


def test_active_checks_take_out_and_bring_back():
    pool = Pool.from_addresses(["a:1"])
    assert pool.record_check("a:1", False, 3, 2) is None
    assert pool.record_check("a:1", False, 3, 2) is None
    assert pool.record_check("a:1", False, 3, 2) is False and pool.loads() == {}
    assert pool.record_check("a:1", True, 3, 2) is None and pool.loads() == {}
    assert pool.record_check("a:1", True, 3, 2) is True and pool.loads() == {"a:1": 0}


def test_passive_ejection_backs_off_and_needs_a_good_check():
    pool = Pool.from_addresses(["a:1", "b:1"])
    assert pool.eject("a:1", base=2, cap=5, now=100) == 2
    assert pool.eject("a:1", base=2, cap=5, now=100.5) == 0  # already out
    assert list(pool.loads()) == ["b:1"]
    pool.record_check("a:1", True, 3, 2, now=101)  # too early: stays out
    assert list(pool.loads()) == ["b:1"]
    assert pool.record_check("a:1", True, 3, 2, now=102.1) is True
    assert list(pool.loads()) == ["a:1", "b:1"]
    assert pool.eject("a:1", base=2, cap=5, now=200) == 4  # repeated: doubled
    pool.record_check("a:1", True, 3, 2, now=205)
    assert pool.eject("a:1", base=2, cap=5, now=300) == 5  # capped
    pool.record_check("a:1", True, 3, 2, now=306)
    pool.succeeded("a:1")
    assert pool.eject("a:1", base=2, cap=5, now=400) == 2  # a success resets the back-off
