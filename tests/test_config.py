"""Configuration sources, precedence, validation, and the CLI's exit status 2."""

import subprocess
import sys

import pytest

from extproc.config import OPTIONS, README_BEGIN, README_END, ConfigError, build, flag_name, markdown_table
from extproc.dev.stack import ROOT
from extproc.addresses import AddressError, parse_hostport, resolve_all


def sglang_router_defaults() -> dict[str, object]:
    """The installed sglang-router's own command-line defaults, by option name."""
    import argparse

    from sglang_router.router_args import RouterArgs

    p = argparse.ArgumentParser()
    RouterArgs.add_cli_args(p)
    return {a.dest: a.default for a in p._actions if a.dest != "help"}


def test_options_marked_sglang_share_its_name_and_default():
    theirs = sglang_router_defaults()
    shared = {name for name, f in OPTIONS.items() if f.metadata["sglang"]}
    assert shared >= {"cache_threshold", "balance_abs_threshold", "balance_rel_threshold", "eviction_interval_secs", "max_tree_size"}
    for name in shared:
        assert name in theirs, f"{name} is marked as sglang-router's but it has no such flag"
        assert OPTIONS[name].default == theirs[name], name
    # a flag we share by name but not marked: its default must be the same, or the flag renamed
    for name in set(OPTIONS) & set(theirs) - shared:
        assert OPTIONS[name].default == theirs[name], f"--{name} shares sglang-router's name but not its default"


def test_help_and_flag_table_come_from_the_options():
    r = run_cli("serve", "--help")
    for name in OPTIONS:
        assert flag_name(name) in r.stdout
    assert "(default 0.3, as sglang-router)" in " ".join(r.stdout.split())
    readme = (ROOT / "README.md").read_text()
    begin, end = README_BEGIN, README_END
    assert readme[readme.index(begin) + len(begin) : readme.index(end)] == markdown_table(), "run make readme"


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
    r = run_cli("serve", "--upstream", "127.0.0.1:9", "--print-config")
    assert r.returncode == 0 and '"127.0.0.1:9"' in r.stdout


def test_a_switch_on_by_default_is_turned_off_with_its_no_flag_and_a_flag_beats_the_file(tmp_path):
    """Sessions are followed by default; ``--no-move-evicted-sessions`` is how a command line turns
    that off, and a switch a file turns on is turned off by the flag (flags beat the file)."""
    import json

    def shown(*flags: str) -> dict:
        r = run_cli("serve", "--upstream", "127.0.0.1:9", *flags, "--print-config")
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    assert shown()["move_evicted_sessions"] is True and shown()["observe_feedback"] is False
    assert shown("--no-move-evicted-sessions")["move_evicted_sessions"] is False
    assert shown("--observe-feedback")["observe_feedback"] is True
    f = tmp_path / "c.toml"
    f.write_text("observe-feedback = true\n")
    assert shown("--config", str(f))["observe_feedback"] is True
    assert shown("--config", str(f), "--no-observe-feedback")["observe_feedback"] is False


def test_addresses():
    assert parse_hostport("[::1]:80") == ("::1", 80)
    assert set(resolve_all("localhost:80")) <= {"127.0.0.1:80", "[::1]:80"}
    assert resolve_all("[::1]:80") == ["[::1]:80"]
    with pytest.raises(AddressError):
        resolve_all("no-such-host.invalid:80")


def test_the_readme_rule_in_one_paragraph_names_the_defaults_as_they_ship():
    """The README sums the decision up in one paragraph with its figures written out (the issue
    asked for a rule that fits one); a default changed without the paragraph would leave readers
    a rule the service does not run."""
    readme = (ROOT / "README.md").read_text()
    start = readme.index("**The rule in one paragraph.**")
    para = " ".join(readme[start:readme.index("\n\n", start)].split())
    d = {name: f.default for name, f in OPTIONS.items()}
    for phrase in (
        f"plus {d['inflight_cost_chars']:,} for each request it has in flight beyond the least loaded upstream's",
        f"only beyond {d['continuation_knee']} requests in flight per worker of their router",
        f"brings {d['new_prefix_own_chars']:,} characters of its own past a shared system prompt",
        f"is charged load only beyond {d['new_prefix_knee']},",
        f"plus {d['new_prefix_weight']} requests for each new prefix its upstream took among the last {d['new_prefix_window']}",
        f"have run {d['move_family_turns']:g} turns on average",
    ):
        assert phrase in para, phrase
    assert d["hit_choice"] == "cost" and d["move_evicted_sessions"] and d["inflight_slack"] == 0 and d["workers_endpoint"]
