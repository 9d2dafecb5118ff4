"""``prefix-router``: the command line.

``serve`` runs the ext_proc service (``--print-config`` prints what its flags, environment and file
give, and exits). ``upstreams``, ``explain``, ``tree`` and ``config`` ask the running service through
its admin gRPC API and print a table, or JSON with ``--json``. Every flag of ``serve`` is generated
from the options in :mod:`extproc.config`. Bad values exit with status 2 and one line naming the flag.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from typing import Any, NoReturn, Sequence

import orjson

from .config import HEALTH, LOGS, OPTIONS, PAYLOAD, POLICY, SECURITY, SERVICE, SYNC, ConfigError, build, flag_name, help_text

DESCRIPTION = """\
Envoy ext_proc service that pins each LLM request to the SGLang router whose workers most likely
hold the prompt's prefix in their KV cache. Envoy streams each request here; the service answers
with an x-upstream-host: IP:PORT header that Envoy's ORIGINAL_DST cluster connects to.

Settings come from flags, then PREFIX_ROUTER_<NAME> environment variables (for example
PREFIX_ROUTER_UPSTREAMS=10.0.0.1:30000,10.0.0.2:30000), then --config FILE (TOML or YAML, keys
spelt like the flags), then defaults. Flags shared with sglang-router keep its names and defaults;
--hit-choice and --tie-break default to the rules measured best here (README).
"""

EXAMPLE = """\
example:
  prefix-router serve --upstream 127.0.0.1:30001 --upstream 127.0.0.1:30002
  then point Envoy at it with envoy/duplex.yaml (see README.md)
"""

ADMIN_DEFAULT = OPTIONS["admin_grpc_listen"].default
GROUP_TITLES = {
    SERVICE: "service",
    SECURITY: "security (README: Security)",
    HEALTH: "upstream health",
    POLICY: "policy (flags marked 'as sglang-router' share its cache_aware names and 0.3.2 defaults)",
    PAYLOAD: "payload",
    SYNC: "replicas (README: Several replicas)",
    LOGS: "logs",
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, status 2
        self.exit(2, f"{self.prog}: error: {message}\n")


def _add_serve_flags(p: argparse.ArgumentParser) -> None:
    """One flag per option, in the options' order and groups; unset flags stay out of the result
    (argparse.SUPPRESS) so that the environment and the config file can fill them."""
    groups = {key: p.add_argument_group(title) for key, title in GROUP_TITLES.items()}
    for name, f in OPTIONS.items():
        meta = f.metadata
        kw: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS, "help": help_text(name)}
        if f.type in (bool, "bool"):
            kw["action"] = argparse.BooleanOptionalAction  # --X, and --no-X to turn off one that defaults on
        else:
            kw["metavar"] = meta["metavar"]
            if name == "upstreams":
                kw["action"] = "append"
        groups[meta["group"]].add_argument(flag_name(name), **kw)


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="prefix-router", description=DESCRIPTION, epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    serve = sub.add_parser("serve", help="run the ext_proc gRPC service", description=DESCRIPTION, epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    serve.add_argument("--print-config", action="store_true", help="print the configuration these flags, the environment and the file give, as JSON, and exit")
    _add_serve_flags(serve)

    def admin_command(name: str, help: str) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=help, description=help)
        c.add_argument("--admin-grpc", metavar="HOST:PORT", default=ADMIN_DEFAULT, help=f"the running service's admin gRPC address (default {ADMIN_DEFAULT})")
        c.add_argument("--json", action="store_true", help="print JSON instead of a table")
        c.add_argument(
            "--admin-token-file", metavar="FILE", default=os.environ.get("PREFIX_ROUTER_ADMIN_TOKEN_FILE"),
            help="the service's admin token (default: $PREFIX_ROUTER_ADMIN_TOKEN_FILE)",
        )
        return c

    ups = admin_command("upstreams", "list the running service's upstreams (or replace them with --set)")
    ups.add_argument("--set", metavar="HOST:PORT,...", help="replace the configured upstreams until the next reload")
    exp = admin_command("explain", "show the decision the running service would make for a request body (dry run)")
    exp.add_argument("file", metavar="FILE.json", help="the request body ('-' for standard input)")
    exp.add_argument("--path", default="/v1/chat/completions", help="the request path (default /v1/chat/completions)")
    admin_command("tree", "show the running service's tree size")
    admin_command("config", "print the running service's effective configuration")
    return p


# -- the admin commands ----------------------------------------------------------------------------


def _table(rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> str:
    """A plain text table: one header line, one line per row, columns aligned."""
    cells = [[title for _, title in columns]] + [[_cell(r[key]) for key, _ in columns] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in cells)


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


def _pairs(d: dict[str, Any]) -> str:
    width = max(map(len, d), default=0)
    return "\n".join(f"{k.ljust(width)}  {_cell(v) if not isinstance(v, list) else ', '.join(map(str, v)) or '-'}" for k, v in d.items())


def render(command: str, data: dict[str, Any]) -> str:
    """What a person reads for one admin reply (``data`` is what ``--json`` prints)."""
    if command == "upstreams":
        cols = [("address", "UPSTREAM"), ("healthy", "HEALTHY"), ("health_check", "CHECK"), ("ejected", "EJECTED"), ("inflight", "IN FLIGHT"), ("tree_characters", "TREE CHARS"),
                ("workers", "WORKERS")]
        return _table(data["upstreams"], cols) + f"\n\nconfigured: {', '.join(data['configured'])}"
    if command == "tree":
        per_upstream = ("characters_per_upstream", "observed_hit_ratio_per_upstream", "learnt_budget_per_upstream")
        head = {k: v for k, v in data.items() if k not in per_upstream}
        observed = data.get("observed_hit_ratio_per_upstream", {})
        learnt = data.get("learnt_budget_per_upstream", {})
        per = [{"upstream": a, "chars": n, "observed": observed.get(a, "-"), "budget": learnt.get(a, "-")}
               for a, n in data["characters_per_upstream"].items()]
        cols = [("upstream", "UPSTREAM"), ("chars", "CHARACTERS"), ("observed", "OBSERVED HITS"), ("budget", "LEARNT BUDGET")]
        return _pairs(head) + ("\n\n" + _table(per, cols) if per else "")
    if command == "explain":
        head = {k: v for k, v in data.items() if k not in ("upstreams", "session")}
        if "session" in data:
            head.update({f"session_{k}": v for k, v in data["session"].items()})
        cols = [("address", "UPSTREAM"), ("matched_characters", "MATCHED"), ("inflight", "IN FLIGHT"), ("healthy", "HEALTHY"),
                ("workers", "WORKERS"), ("continuation_knee", "KNEE"), ("recompute_characters", "RECOMPUTE"), ("charged_requests", "CHARGED"), ("cost", "COST"),
                ("observed_hit_ratio", "OBSERVED HITS"), ("observed_responses", "SAMPLED"), ("new_prefixes_lately", "NEW PREFIXES")]
        return _pairs(head) + "\n\n" + _table(data["upstreams"], cols)
    return _pairs(data)


def _reply_data(command: str, reply: Any) -> dict[str, Any]:
    """An admin reply as plain JSON-able data: numbers as numbers, fields in a fixed order, no
    fields that carry nothing."""
    if command == "upstreams":
        return {
            "upstreams": [
                {"address": u.address, "healthy": u.healthy, "health_check": "up" if u.active_ok else "down", "ejected": u.ejected,
                 "inflight": u.inflight, "tree_characters": u.tree_characters, "workers": u.workers or None}
                for u in reply.upstreams
            ],
            "configured": list(reply.configured),
        }
    if command == "tree":
        return {"stored_characters": reply.stored_characters, "nodes": reply.nodes, "max_tree_size_per_upstream": reply.max_tree_size,
                "characters_per_upstream": dict(sorted(reply.characters_per_upstream.items())),
                "observed_hit_ratio_per_upstream": {a: round(r, 4) for a, r in sorted(reply.observed_hit_ratio_per_upstream.items())},
                "learnt_budget_per_upstream": dict(sorted(reply.learnt_budget_per_upstream.items()))}
    if command == "explain":
        out: dict[str, Any] = {"upstream": reply.upstream or None, "reason": reply.reason}
        if reply.no_text_reason:
            out["no_text_reason"] = reply.no_text_reason
        out.update(partition=reply.partition, text_characters=reply.text_characters, matched_characters=reply.matched_characters,
                   match_rate=round(reply.match_rate, 4), continuation=reply.continuation, new_prefix=reply.new_prefix,
                   routing_text_head=reply.routing_text_head)
        if reply.HasField("session"):  # --move-evicted-sessions' terms
            o = reply.session
            out["session"] = {"new": o.new, "turn": o.turn, "shared": o.shared, "over": o.over, "family_turns": round(o.family_turns, 2),
                              "evicted": o.evicted, "moved": o.moved, "moves": o.moves}
        out["upstreams"] = [{"address": u.address, "matched_characters": u.matched_characters, "inflight": u.inflight, "healthy": u.healthy,
                             "workers": u.workers or None, "continuation_knee": u.continuation_knee,
                             "recompute_characters": u.recompute_characters, "charged_requests": u.charged_requests, "cost": u.cost,
                             "observed_hit_ratio": round(u.observed_hit_ratio, 4), "observed_responses": u.observed_responses,
                             "new_prefixes_lately": u.new_prefixes_lately}
                            for u in reply.upstreams]
        return out
    return orjson.loads(reply.config_json)


def admin_call(args: dict) -> int:
    """``upstreams``, ``explain``, ``tree``, ``config``: one admin gRPC call, printed."""
    import grpc

    from .api.v1 import admin_pb2 as pb
    from .api.v1 import admin_pb2_grpc as pb_grpc

    command = args["command"]
    try:
        if command == "explain":
            body = sys.stdin.buffer.read() if args["file"] == "-" else open(args["file"], "rb").read()
        token = open(args["admin_token_file"], "rb").read().strip().decode() if args["admin_token_file"] else ""
    except OSError as exc:
        sys.stderr.write(f"prefix-router: error: {exc.filename}: {exc.strerror}\n")
        return 2
    call = {"timeout": 10, "metadata": (("authorization", f"Bearer {token}"),)}
    with grpc.insecure_channel(args["admin_grpc"]) as channel:
        stub = pb_grpc.AdminStub(channel)
        try:
            if command == "upstreams" and args.get("set"):
                reply = stub.SetUpstreams(pb.SetUpstreamsRequest(upstreams=args["set"].split(",")), **call)
            elif command == "upstreams":
                reply = stub.ListUpstreams(pb.ListUpstreamsRequest(), **call)
            elif command == "explain":
                reply = stub.Explain(pb.ExplainRequest(path=args["path"], body=body), **call)
            elif command == "tree":
                reply = stub.TreeStats(pb.TreeStatsRequest(), **call)
            else:
                reply = stub.GetConfig(pb.GetConfigRequest(), **call)
        except grpc.RpcError as exc:
            sys.stderr.write(f"prefix-router: error: {args['admin_grpc']}: {exc.code().name}: {exc.details()}\n")
            return 1
    data = _reply_data(command, reply)
    text = orjson.dumps(data, option=orjson.OPT_INDENT_2).decode() if args["json"] else render(command, data)
    sys.stdout.write(text + "\n")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = vars(parser().parse_args(argv))
    command = args.pop("command")
    if command != "serve":
        return admin_call({"command": command, **args})
    print_config = args.pop("print_config")
    try:
        cfg = build(args)
    except ConfigError as exc:
        sys.stderr.write(f"prefix-router: error: {exc}\n")
        return 2
    if print_config:
        sys.stdout.write(orjson.dumps(cfg.as_dict(), option=orjson.OPT_INDENT_2).decode() + "\n")
        return 0
    from . import logs
    from .addresses import AddressError
    from .server import serve

    if not cfg.upstreams and not cfg.upstreams_file:
        sys.stderr.write("prefix-router: error: --upstream: at least one upstream is required (or PREFIX_ROUTER_UPSTREAMS, or --upstreams-file)\n")
        return 2
    if cfg.processes > 1:
        from . import processes

        try:
            return processes.run(cfg, argv[argv.index("serve") + 1:])
        except (ConfigError, OSError) as exc:
            sys.stderr.write(f"prefix-router: error: {exc}\n")
            return 2
    logs.configure(cfg.log_level, cfg.log_format)
    try:
        # A reload re-reads the environment and the config file under the same flags.
        return asyncio.run(serve(cfg, reload=lambda: build(args)))
    except AddressError as exc:
        sys.stderr.write(f"prefix-router: error: --upstream: {exc}\n")
        return 2
    except OSError as exc:
        sys.stderr.write(f"prefix-router: error: {exc}\n")
        return 2
