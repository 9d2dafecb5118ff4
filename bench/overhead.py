"""What the service adds to a request's latency and costs in throughput, through real Envoy.

    .venv/bin/python -m bench.overhead      → bench/results/overhead.json   (needs wrk: apt-get install wrk)

The upstreams are made fast enough never to be the bottleneck: two listeners of a separate Envoy
answering every request directly. In the same run, wrk (one thread, 10 s each, --latency) drives:

- ``envoy-direct``: Envoy routing straight to the two upstreams (round robin): the baseline;
- ``envoy+prefix-router duplex`` / ``buffered``: the shipped configs with the service deciding;
- ``envoy+prefix-router duplex|buffered, every response read``: ``--observe-sample 1``, the cost
  of a sampled request (its response's headers and body pass through the service: in duplex mode
  through the observing filter, in observability mode; in buffered mode by ``mode_override``);
- ``sglang-router``: one sglang-router (cache_aware) over the same two upstreams, the single-layer
  alternative;
- ``envoy+grpc floor duplex``: ``envoy/duplex.yaml`` with bench.cpu's floor in the service's place
  (a grpcio asyncio server answering with the service's own answer, made beforehand): what the
  path costs before the service does any work, so what part of the added latency is this project's.

at 1 connection (added latency) and 16 connections (throughput). The body is a 2 KB chat request.
Targets ([eval]): added p50 latency <= 1 ms, throughput >= 60% of envoy-direct.

Then, streamed responses (``streamed`` rows): the same request with ``"stream": true`` to two fake
workers (``extproc.dev.fakeworker``) that answer with ``STREAM_TOKENS`` server-sent events one
``TOKEN_DELAY`` apart, so each event reaches Envoy as its own chunk, as a real worker's tokens do.
Each mode with and without ``--observe-sample 1``: a sampled streamed response passes through
the service chunk by chunk (buffered: one ext_proc message and answer per chunk; duplex: one
message per chunk, no answer awaited), which is what a sampled request costs when clients stream. The workers are Python processes
on the same cores, so only the difference between the two rows is the service's.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import orjson
import yaml

from extproc.dev.stack import ENVOY_DIR, HOST, Ports, Stack, find_envoy, free_port, http_get, wait_until, work_dir

from .common import write

BODY = orjson.dumps({"model": "fake-model", "messages": [
    {"role": "system", "content": "You are a helpful assistant. " * 40},
    {"role": "user", "content": "What is the weather like on the coast today? " * 18},
]})
# (name, envoy/<mode>.yaml, service flags); "every response read": the cost of a sampled request
VARIANTS = (("duplex", "duplex", []), ("duplex, every response read", "duplex", ["--observe-sample", "1"]),
            ("buffered", "buffered", []), ("buffered, every response read", "buffered", ["--observe-sample", "1"]))
# Envoy (duplex) with bench.cpu's floor for the service: the share of the added latency that is gRPC's
FLOOR = "envoy+grpc floor duplex"
STREAM_BODY = orjson.dumps({**orjson.loads(BODY), "stream": True, "stream_options": {"include_usage": True}})
STREAM_TOKENS = 16
TOKEN_DELAY = 0.0005
ANSWER = '{"id":"chatcmpl-1","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"ok"},"finish_reason":"stop"}]}'


def _hcm(route: dict) -> dict:
    return {"name": "envoy.filters.network.http_connection_manager", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "bench", "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [route]}]},
        "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]}}


def upstream_config(admin: int, ports: list[int]) -> dict:
    """A separate Envoy whose listeners answer every request at once: upstreams that cost ~nothing."""
    route = {"match": {"prefix": "/"}, "direct_response": {"status": 200, "body": {"inline_string": ANSWER}}}
    return {"admin": {"address": {"socket_address": {"address": HOST, "port_value": admin}}},
            "static_resources": {"listeners": [{"name": f"u{i}", "address": {"socket_address": {"address": HOST, "port_value": p}},
                                                "filter_chains": [{"filters": [_hcm(route)]}]} for i, p in enumerate(ports)]}}


def direct_config(admin: int, listen: int, upstreams: list[int], lb_policy: str = "ROUND_ROBIN", hash_header: str | None = None) -> dict:
    """Envoy routing straight to the upstreams: the baseline without prefix-router; with
    ``hash_header``, a consistent hash (``lb_policy`` RING_HASH) of that request header."""
    route: dict = {"cluster": "direct", "timeout": "120s"}
    if hash_header:
        route["hash_policy"] = [{"header": {"header_name": hash_header}}]
    return {"admin": {"address": {"socket_address": {"address": HOST, "port_value": admin}}},
            "static_resources": {
                "listeners": [{"name": "ingress", "address": {"socket_address": {"address": HOST, "port_value": listen}},
                               "filter_chains": [{"filters": [_hcm({"match": {"prefix": "/"}, "route": route})]}]}],
                "clusters": [{"name": "direct", "type": "STATIC", "connect_timeout": "1s", "lb_policy": lb_policy,
                              "load_assignment": {"cluster_name": "direct", "endpoints": [
                    {"lb_endpoints": [{"endpoint": {"address": {"socket_address": {"address": HOST, "port_value": p}}}} for p in upstreams]}]}}]}}


def wrk(url: str, connections: int, seconds: int, script: Path) -> dict:
    out = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", "-s", str(script), url],
                         capture_output=True, text=True, timeout=seconds + 30).stdout

    def ms(label: str) -> float:
        m = re.search(rf"^\s*{label}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        value, unit = float(m.group(1)), m.group(2)
        return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value

    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    return {"connections": connections, "rps": rps, "p50_ms": ms("50"), "p90_ms": ms("90"), "p99_ms": ms("99"),
            "non_2xx": int(non2xx.group(1)) if non2xx else 0}


def wrk_script(path: Path, body: bytes) -> Path:
    """A wrk script that POSTs ``body`` as JSON."""
    path.write_text(f'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\nwrk.body = {orjson.dumps(body.decode()).decode()}\n')
    return path


@contextmanager
def wrk_setup(prefix: str) -> Iterator[tuple[Path, Path]]:
    """A work folder (``work_dir``: gone after a good run) and the wrk script that POSTs ``BODY``;
    exits when wrk is missing."""
    if not shutil.which("wrk"):
        raise SystemExit("wrk not found: apt-get install wrk")
    with work_dir(prefix) as work:
        yield work, wrk_script(work / "post.lua", BODY)


def start_envoy(work: Path, name: str, cfg: dict, admin: int) -> subprocess.Popen:
    """A bare Envoy (one worker thread) from ``cfg``, once its admin says LIVE."""
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = subprocess.Popen([find_envoy(), "-c", str(path), "--disable-hot-restart", "--log-level", "error", "--concurrency", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_until(lambda: http_get(f"http://{HOST}:{admin}/ready")[1].strip() == b"LIVE", 30, name, proc)
    return proc


def main(seconds: int = 10) -> dict:
    with wrk_setup("bench-overhead-") as (work, script):
        return _run(work, script, seconds)


def _run(work: Path, script: Path, seconds: int) -> dict:
    ups = [free_port(), free_port()]
    procs: list[subprocess.Popen] = []

    def envoy(name: str, cfg: dict, admin: int) -> None:
        procs.append(start_envoy(work, name, cfg, admin))

    rows = []
    through: dict[str, Stack] = {}  # the variants through ext_proc, by name (the service's and the floor's)
    try:
        ua = free_port()
        envoy("upstreams", upstream_config(ua, ups), ua)
        da, dl = free_port(), free_port()
        envoy("direct", direct_config(da, dl, ups), da)
        variants = {"envoy-direct": f"http://{HOST}:{dl}/v1/chat/completions"}
        # the last: every response read for its usage (--observe-sample 1), the cost of a sampled request
        for name, mode, extra in VARIANTS:
            through[f"envoy+prefix-router {name}"] = _service_stack(work / name.replace(" ", "").replace(",", "-"), mode, extra, ups)
        through[FLOOR] = _floor_stack(work / "floor", ups)
        variants |= {name: f"{s.base_url}/chat/completions" for name, s in through.items()}
        router_port = free_port()
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "sglang_router.launch_router", "--host", HOST, "--port", str(router_port),
             "--worker-urls", *[f"http://{HOST}:{p}" for p in ups], "--policy", "cache_aware", "--prometheus-host", HOST,
             "--prometheus-port", str(free_port()), "--log-level", "error"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_until(lambda: http_get(f"http://{HOST}:{router_port}/get_loads")[1].count(b'"worker"') >= 2, 60, "sglang-router")
        variants["sglang-router"] = f"http://{HOST}:{router_port}/v1/chat/completions"
        for connections in (1, 16):
            for name, url in variants.items():
                stack = through.get(name)
                measured = _measure_stack(stack, url, connections, seconds, script) if stack else _measure(url, connections, seconds, script)
                rows.append({"path": name, **measured})
    finally:
        for s in through.values():
            s.stop()
        for p in procs:
            p.terminate()
            p.wait(10)
    streamed = _streamed(work, seconds)
    base = {r["connections"]: r for r in rows if r["path"] == "envoy-direct"}
    for r in rows:
        r["added_p50_ms"] = r["p50_ms"] - base[r["connections"]]["p50_ms"]
        r["throughput_vs_direct"] = r["rps"] / base[r["connections"]]["rps"]
    floor_rows = {r["connections"]: r for r in rows if r["path"] == FLOOR}
    above = {str(r["connections"]): r["p50_ms"] - floor_rows[r["connections"]]["p50_ms"] for r in rows if r["path"] == "envoy+prefix-router duplex"}
    result = {"benchmark": "overhead", "seconds": seconds, "body_bytes": len(BODY), "rows": rows,
              "targets": {"added_p50_ms_max": 1.0, "throughput_vs_direct_min": 0.6}, "streamed": streamed,
              # what the service itself adds over a server that does nothing but answer (p50, ms, by connections)
              "duplex_above_grpc_floor_p50_ms": above}
    print(f"wrote {write('overhead', result)}")
    return result


def _floor_stack(workdir: Path, upstreams: list[int]) -> Stack:
    """Envoy's ``envoy/duplex.yaml`` in front of bench.cpu's floor instead of the service: a gRPC
    server answering every request with the service's own answer to BODY, made beforehand (so it
    routes to ``upstreams`` as the service would). What any ext_proc service written with grpcio's
    asyncio API costs on this path before it does any work of its own."""
    ports = Ports.free(2, 0)
    ports.routers = upstreams
    s = Stack(ports, envoy_config=ENVOY_DIR / "duplex.yaml", workdir=workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    with open(workdir / "floor.log", "ab") as log:
        s.procs["service-0"] = subprocess.Popen(  # the Stack waits for Envoy's health check of it, and stops it
            [sys.executable, "-m", "bench.cpu", "--serve", "floor", str(ports.services[0]), *(f"{HOST}:{p}" for p in upstreams)],
            stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT, cwd=Path(__file__).resolve().parent.parent, start_new_session=True)
    try:
        wait_until(lambda: b"ready" in (workdir / "floor.log").read_bytes(), 60, "the floor server", s.procs["service-0"])
        s.start_envoy()
    except BaseException:
        s.stop()
        raise
    return s


def _service_stack(workdir: Path, mode: str, extra: list[str], upstreams: list[int]) -> Stack:
    """The service (with ``extra`` flags) and Envoy's ``envoy/<mode>.yaml`` in front of ``upstreams``."""
    ports = Ports.free(2, 0)
    ports.routers = upstreams
    s = Stack(ports, envoy_config=ENVOY_DIR / f"{mode}.yaml", workdir=workdir, service_args=["--health-interval-secs", "5", *extra])
    s.start_service()
    s.start_envoy()
    return s


def _measure(url: str, connections: int, seconds: int, script: Path) -> dict:
    wrk(url, connections, 2, script)  # warm up
    row = wrk(url, connections, seconds, script)
    print(f"{url:48s} c={connections:<3d} {row['rps']:8.0f} req/s  p50 {row['p50_ms']:.2f} ms  p99 {row['p99_ms']:.2f} ms  non-2xx {row['non_2xx']}", flush=True)
    return row


def _routed(s: Stack) -> tuple[int, int]:
    """Requests Envoy sent to the pinned cluster and to the fallback one (both cumulative)."""
    return (s.envoy_counter(r"^cluster\.sglang_routers_pinned\.upstream_rq_total$"),
            s.envoy_counter(r"^cluster\.sglang_routers_fallback\.upstream_rq_total$"))


def _measure_stack(s: Stack, url: str, connections: int, seconds: int, script: Path) -> dict:
    """``_measure`` through a stack with the service (or the floor), and the share of the measured
    requests that failed open to the fallback route: a benchmark that silently failed open would
    time a path without ext_proc, so each row says how much of it did."""
    before = _routed(s)
    row = _measure(url, connections, seconds, script)
    after = _routed(s)
    pinned, fallback = after[0] - before[0], after[1] - before[1]
    if not pinned + fallback:
        raise RuntimeError("Envoy counted no request on either router cluster: are its stats named as _routed reads them?")
    row["fallback_share"] = fallback / (pinned + fallback)
    if row["fallback_share"] > 0.01:
        print(f"  WARNING: {100 * row['fallback_share']:.1f} % of these requests failed open to the fallback route", flush=True)
    return row


def _ext_proc_messages(s: Stack) -> tuple[int, int]:
    """Envoy's count of messages it sent on ext_proc streams, and of streams started (both cumulative)."""
    return s.envoy_counter(r"ext_proc.*\.stream_msgs_sent$"), s.envoy_counter(r"ext_proc.*\.streams_started$")


def _streamed(work: Path, seconds: int) -> dict:
    """Streamed responses from fake workers, through each mode with and without reading them."""
    script = wrk_script(work / "stream.lua", STREAM_BODY)
    ports = Ports.free(2, 0)
    ports.routers = [free_port(), free_port()]
    rows, stacks, workers = [], [], []
    try:
        for i, p in enumerate(ports.routers):
            workers.append(subprocess.Popen(
                [sys.executable, "-m", "extproc.dev.fakeworker", "--host", HOST, "--port", str(p), "--name", f"w{i}",
                 "--output-tokens", str(STREAM_TOKENS), "--token-delay", str(TOKEN_DELAY)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        for i, p in enumerate(ports.routers):
            wait_until(lambda p=p: http_get(f"http://{HOST}:{p}/health")[0] == 200, 30, "fake worker", workers[i])
        for name, mode, extra in VARIANTS:
            stacks.append((name, mode, bool(extra), _service_stack(work / f"streamed-{len(stacks)}", mode, extra, ports.routers)))
        for connections in (1, 16):
            for name, mode, reads, s in stacks:
                before = _ext_proc_messages(s)
                row = {"path": f"streamed, {name}", "mode": mode, "reads_responses": reads,
                       **_measure_stack(s, f"{s.base_url}/chat/completions", connections, seconds, script)}
                after = _ext_proc_messages(s)
                row["responses_read"] = s.service_metric(0, "prefix_router_observations_total", result="read")
                row["ext_proc_messages_per_request"] = (after[0] - before[0]) / max(1, after[1] - before[1])
                rows.append(row)
    finally:
        for *_, s in stacks:
            s.stop()
        for w in workers:
            w.terminate()
            w.wait(10)
    for r in rows:  # against the same mode without reading
        base = next(b for b in rows if b["connections"] == r["connections"] and b["mode"] == r["mode"] and not b["reads_responses"])
        r["added_p50_ms"] = r["p50_ms"] - base["p50_ms"]
        r["throughput_vs_unsampled"] = r["rps"] / base["rps"]
    return {"tokens_per_response": STREAM_TOKENS, "token_delay_s": TOKEN_DELAY, "rows": rows}


if __name__ == "__main__":
    main()
