"""``prefix-router``: the command line.

Subcommands: ``serve`` (the ext_proc service), ``config`` (print the effective configuration).
Bad values exit with status 2 and one line naming the flag.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import NoReturn, Sequence

import orjson

from .config import Config, ConfigError, build

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


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, status 2
        self.exit(2, f"{self.prog}: error: {message}\n")


def _add_serve_flags(p: argparse.ArgumentParser) -> None:
    S = argparse.SUPPRESS
    g = p.add_argument_group("service")
    g.add_argument("--grpc-listen", metavar="HOST:PORT", default=S, help="gRPC listen address for Envoy (default 0.0.0.0:50051)")
    g.add_argument("--admin-listen", metavar="HOST:PORT", default=S, help="HTTP /metrics, /healthz, /readyz (default 127.0.0.1:9464)")
    g.add_argument(
        "--upstream", dest="upstreams", metavar="HOST:PORT", action="append", default=S,
        help="an SGLang router instance; repeat for each (or PREFIX_ROUTER_UPSTREAMS=a,b). "
        "A name gives all its addresses, re-resolved every --dns-refresh-secs: the header always carries an IP literal",
    )
    g.add_argument("--upstreams-file", metavar="FILE", default=S, help="a YAML or JSON list of HOST:PORT, re-read when it changes")
    g.add_argument("--dns-refresh-secs", metavar="S", default=S, help="re-resolve upstream names this often (default 30); a name gives all its addresses")
    g.add_argument("--admin-grpc-listen", metavar="HOST:PORT", default=S, help="the admin gRPC API (default 127.0.0.1:9465)")
    g.add_argument("--header-name", metavar="NAME", default=S, help="header Envoy's ORIGINAL_DST cluster reads (default x-upstream-host)")
    g.add_argument("--config", metavar="FILE", default=S, help="TOML (.toml) or YAML config file")
    g.add_argument("--drain-timeout-secs", type=str, metavar="S", default=S, help="on SIGTERM, how long streams in flight may take (default 20)")
    g.add_argument(
        "--shutdown-delay-secs", metavar="S", default=S,
        help="on SIGTERM, keep serving this long while reporting NOT_SERVING, so Envoy's health check "
        "moves new requests away first (default 2; Envoy's shipped check runs every 1 s)",
    )
    g.add_argument(
        "--inflight-timeout-secs", metavar="S", default=S,
        help="release an in-flight count whose finish report never came after this long (default 900)",
    )
    g = p.add_argument_group("upstream health")
    g.add_argument("--health-interval-secs", metavar="S", default=S, help="GET /health on each upstream this often (default 2)")
    g.add_argument("--health-check-timeout-secs", metavar="S", default=S, help="timeout of one check (default 5, as sglang-router)")
    g.add_argument("--health-failure-threshold", metavar="N", default=S, help="failed checks in a row that take an upstream out (default 3, as sglang-router)")
    g.add_argument("--health-success-threshold", metavar="N", default=S, help="good checks in a row that bring it back (default 2, as sglang-router)")
    g.add_argument("--health-check-endpoint", metavar="PATH", default=S, help="the path checked (default /health)")
    g.add_argument(
        "--ejection-base-secs", metavar="S", default=S,
        help="a refused connection or 502/503/504 seen on real traffic ejects the upstream this long, doubling on repeats (default 2)",
    )
    g.add_argument("--ejection-max-secs", metavar="S", default=S, help="the longest ejection (default 60)")
    g = p.add_argument_group("policy (sglang-router's cache_aware names and 0.3.2 defaults)")
    g.add_argument("--cache-threshold", metavar="X", default=S, help="route to a prefix holder when matched/text length is above this (default 0.3)")
    g.add_argument("--balance-abs-threshold", metavar="N", default=S, help="imbalance when max-min in-flight is above this... (default 64)")
    g.add_argument("--balance-rel-threshold", metavar="X", default=S, help="...and max is above min times this: go to the least loaded (default 1.5)")
    g.add_argument("--eviction-interval-secs", metavar="S", default=S, help="how often the tree is trimmed to --max-tree-size (default 60)")
    g.add_argument("--max-tree-size", metavar="CHARS", default=S, help="characters the tree may hold per upstream (default 67108864)")
    g.add_argument(
        "--hit-choice", metavar="cost|balanced|creator|least_loaded", default=S,
        help="how a prefix match and load combine (default cost: least recompute-plus-queue cost; creator is sglang-router's rule; see README)",
    )
    g.add_argument(
        "--inflight-cost-chars", metavar="N", default=S,
        help="with --hit-choice cost: characters of prefix recompute that one in-flight request is worth (default 1024)",
    )
    g.add_argument("--tie-break", metavar="random|first", default=S, help="among equally loaded upstreams (default random; sglang-router 0.3.2 takes the first)")
    g = p.add_argument_group("payload")
    g.add_argument("--routing-text", metavar="sglang|template", default=S, help="what the tree matches on (default sglang, as sglang-router)")
    g.add_argument("--max-routing-chars", metavar="N", default=S, help="only this many leading characters of a prompt are matched (default 1048576)")
    g.add_argument("--max-body-bytes", metavar="N", default=S, help="bodies (after decompression) larger than this are routed by load only (default 67108864)")
    g = p.add_argument_group("logs")
    g.add_argument("--log-level", metavar="LEVEL", default=S, help="debug, info, warning or error (default info; debug logs each decision)")
    g.add_argument("--log-format", metavar="FMT", default=S, help="json, console, or auto: console on a terminal (default auto)")
    g.add_argument("--log-prompts", action="store_const", const=True, default=S, help="include routing text in debug logs (off: prompts are private)")


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="prefix-router", description=DESCRIPTION, epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    serve = sub.add_parser("serve", help="run the ext_proc gRPC service", description=DESCRIPTION, epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_serve_flags(serve)
    show = sub.add_parser("config", help="print the effective configuration as JSON and exit")
    _add_serve_flags(show)
    admin_help = "the running service's admin gRPC address (default 127.0.0.1:9465)"
    ups = sub.add_parser("upstreams", help="list the running service's upstreams (or replace them with --set)")
    ups.add_argument("--admin-grpc", metavar="HOST:PORT", default="127.0.0.1:9465", help=admin_help)
    ups.add_argument("--set", metavar="HOST:PORT,...", help="replace the configured upstreams until the next reload")
    exp = sub.add_parser("explain", help="show the decision the running service would make for a request body (dry run)")
    exp.add_argument("file", metavar="FILE.json", help="the request body ('-' for standard input)")
    exp.add_argument("--path", default="/v1/chat/completions", help="the request path (default /v1/chat/completions)")
    exp.add_argument("--admin-grpc", metavar="HOST:PORT", default="127.0.0.1:9465", help=admin_help)
    tree = sub.add_parser("tree", help="show the running service's tree size")
    tree.add_argument("--admin-grpc", metavar="HOST:PORT", default="127.0.0.1:9465", help=admin_help)
    return p


def admin_call(args: dict) -> int:
    """``upstreams``, ``explain`` and ``tree``: one admin gRPC call, printed as JSON."""
    import grpc
    from google.protobuf import json_format

    from .api.v1 import admin_pb2 as pb
    from .api.v1 import admin_pb2_grpc as pb_grpc

    command = args["command"]
    if command == "explain":
        try:
            body = sys.stdin.buffer.read() if args["file"] == "-" else open(args["file"], "rb").read()
        except OSError as exc:
            sys.stderr.write(f"prefix-router: error: {args['file']}: {exc.strerror}\n")
            return 2
    with grpc.insecure_channel(args["admin_grpc"]) as channel:
        stub = pb_grpc.AdminStub(channel)
        try:
            if command == "upstreams" and args.get("set"):
                reply = stub.SetUpstreams(pb.SetUpstreamsRequest(upstreams=args["set"].split(",")), timeout=10)
            elif command == "upstreams":
                reply = stub.ListUpstreams(pb.ListUpstreamsRequest(), timeout=10)
            elif command == "explain":
                reply = stub.Explain(pb.ExplainRequest(path=args["path"], body=body), timeout=10)
            else:
                reply = stub.TreeStats(pb.TreeStatsRequest(), timeout=10)
        except grpc.RpcError as exc:
            sys.stderr.write(f"prefix-router: error: {args['admin_grpc']}: {exc.code().name}: {exc.details()}\n")
            return 1
    sys.stdout.write(json_format.MessageToJson(reply, always_print_fields_with_no_presence=True, preserving_proto_field_name=True) + "\n")
    return 0


def load(argv: Sequence[str] | None = None) -> tuple[str, Config, dict]:
    args = vars(parser().parse_args(argv))
    command = args.pop("command")
    try:
        return command, build(args), args
    except ConfigError as exc:
        sys.stderr.write(f"prefix-router: error: {exc}\n")
        raise SystemExit(2) from None


def main(argv: Sequence[str] | None = None) -> int:
    args = vars(parser().parse_args(argv))
    if args["command"] in ("upstreams", "explain", "tree"):
        return admin_call(args)
    command, cfg, flags = load(argv)
    if command == "config":
        sys.stdout.write(orjson.dumps(cfg.as_dict(), option=orjson.OPT_INDENT_2).decode() + "\n")
        return 0
    from . import logs
    from .pool import AddressError
    from .server import serve

    if not cfg.upstreams and not cfg.upstreams_file:
        sys.stderr.write("prefix-router: error: --upstream: at least one upstream is required (or PREFIX_ROUTER_UPSTREAMS, or --upstreams-file)\n")
        return 2
    logs.configure(cfg.log_level, cfg.log_format)
    try:
        # A reload re-reads the environment and the config file under the same flags.
        return asyncio.run(serve(cfg, reload=lambda: build(flags)))
    except AddressError as exc:
        sys.stderr.write(f"prefix-router: error: --upstream: {exc}\n")
        return 2
    except OSError as exc:
        sys.stderr.write(f"prefix-router: error: {exc}\n")
        return 2
