"""Where the service's time goes per request: gRPC's machinery against this project's code.

    .venv/bin/python -m bench.cpu      → bench/results/cpu.json   (about a minute and a half)

``bench.overhead`` measures the whole path through Envoy; this splits the service's share of it.
Each set-up is fed what Envoy sends for one chat request in the shipped duplex mode (the request
headers, the 2 KB body of bench.overhead in one chunk, then one access-log entry carrying the
request's ticket on a stream kept open), by a client in a process of its own with 16 requests in
flight (bench.overhead's 16 connections), and charged the server process's CPU time (from /proc):

- ``floor``: a gRPC server answering with the very responses the service gives, made beforehand:
  grpcio's asyncio layer, HTTP/2 and the messages' (de)serialization, none of this project's code;
- ``service``: the real service (``extproc.server.Service``, default settings, two upstreams);
- ``in process``: the service's handlers (``ExternalProcessor``, ``AccessLogReceiver``) called
  directly, without gRPC: parsing, the tree, the decision, the responses, metrics and logs (and
  building each access-log entry, which over gRPC is parsed instead).

Then a profile of the in-process path, its time by package. Requests differ (16 sessions of
growing conversations sharing a system prompt), so the tree matches and grows as in use.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import os
import pstats
import selectors
import subprocess
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import grpc
import orjson
from grpc_health.v1 import health, health_pb2_grpc
from envoy.config.core.v3 import base_pb2
from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

from extproc.dev.stack import HOST, free_port
from extproc.director import TICKET_HEADER

from .common import write
from .overhead import BODY

UPSTREAMS = ["127.0.0.1:30001", "127.0.0.1:30002"]
HEADERS = [(":path", "/v1/chat/completions"), (":method", "POST"), (":authority", "llm.example"), ("content-type", "application/json"),
           ("x-request-id", "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"), ("user-agent", "OpenAI/Python 1.40")]
CONCURRENCY = 16
SESSIONS = 16
REQUESTS = 4000
WARMUP = 400
REPEATS = 5


def bodies(n: int) -> list[bytes]:
    """``n`` chat bodies: 16 sessions taking turns, each turn its session's history plus one more
    exchange, all opening with bench.overhead's request."""
    base = orjson.loads(BODY)["messages"]
    history: list[list[dict]] = [list(base) for _ in range(SESSIONS)]
    out = []
    for i in range(n):
        s = i % SESSIONS
        if len(history[s]) > 40:  # a session ends and a new one takes its place
            history[s] = list(base)
        history[s] = history[s] + [{"role": "assistant", "content": f"reply {i} " * 20}, {"role": "user", "content": f"session {s} turn {i} " * 8}]
        out.append(orjson.dumps({"model": "fake-model", "messages": history[s]}))
    return out


def request_messages(body: bytes) -> list[pb.ProcessingRequest]:
    headers = pb.ProcessingRequest(
        request_headers=pb.HttpHeaders(headers=base_pb2.HeaderMap(headers=[base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in HEADERS])),
        protocol_config=pb.ProtocolConfiguration(request_body_mode=processing_mode_pb2.ProcessingMode.FULL_DUPLEX_STREAMED))
    return [headers, pb.ProcessingRequest(request_body=pb.HttpBody(body=body, end_of_stream=True))]


def ticket_of(responses: list[pb.ProcessingResponse]) -> str:
    for r in responses:
        if r.WhichOneof("response") == "request_headers":
            for h in r.request_headers.response.header_mutation.set_headers:
                if h.header.key == TICKET_HEADER:
                    return (h.header.raw_value or h.header.value.encode()).decode()
    raise RuntimeError(f"no ticket in the answer: the request was not routed ({[str(r)[:300] for r in responses]})")


def access_log(ticket: str) -> als_pb2.StreamAccessLogsMessage:
    entry = accesslog_pb2.HTTPAccessLogEntry(request=accesslog_pb2.HTTPRequestProperties(request_headers={TICKET_HEADER: ticket}))
    return als_pb2.StreamAccessLogsMessage(http_logs=als_pb2.StreamAccessLogsMessage.HTTPAccessLogEntries(log_entry=[entry]))


# -- the servers (each in a process of its own: `python -m bench.cpu --serve KIND PORT`) ----------

def _service_config(listen: str, upstreams: list[str] = UPSTREAMS):
    from extproc.config import build

    return build({"grpc_listen": listen, "admin_listen": "127.0.0.1:0", "admin_grpc_listen": "127.0.0.1:0", "upstreams": upstreams}, env={})


def _configure_logs() -> None:
    """Logs as the service's command line sets them (the default level, info): once per process,
    and only in the benchmark's own processes (structlog's set-up is process-wide)."""
    from extproc import logs

    logs.configure(_service_config("127.0.0.1:0").log_level, "json")


class _Floor(pb_grpc.ExternalProcessorServicer, als_pb2_grpc.AccessLogServiceServicer):
    """Answers as the service would, with responses made beforehand: the cost of gRPC alone."""

    def __init__(self, answers: list[pb.ProcessingResponse]) -> None:
        self.answers = answers

    async def Process(self, request_iterator, context):  # noqa: N802 - gRPC method name
        async for req in request_iterator:
            if req.WhichOneof("request") == "request_body" and req.request_body.end_of_stream:
                for r in self.answers:
                    yield r
                return

    async def StreamAccessLogs(self, request_iterator, context):  # noqa: N802 - gRPC method name
        async for _ in request_iterator:
            pass
        return als_pb2.StreamAccessLogsResponse()


async def _serve(kind: str, port: int, upstreams: list[str] | None = None) -> None:
    """Run one server until stdin closes. ``upstreams``: where the floor's answers send requests
    (bench.overhead runs it behind a real Envoy, which health-checks it as it does the service)."""
    _configure_logs()
    listen = f"{HOST}:{port}"
    if kind == "service":
        from extproc.server import Service

        # the upstreams only answer the service's health checks: no request reaches them here
        healthy = [await asyncio.start_server(_ok, HOST, free_port()) for _ in UPSTREAMS]
        svc = Service(_service_config(listen, [f"{HOST}:{h.sockets[0].getsockname()[1]}" for h in healthy]))
        await svc.start()
        stop = lambda: svc.stop(delay=0)  # noqa: E731
    else:
        answers = await _in_process_answers(upstreams or UPSTREAMS)
        server = grpc.aio.server()
        floor = _Floor(answers)
        pb_grpc.add_ExternalProcessorServicer_to_server(floor, server)
        als_pb2_grpc.add_AccessLogServiceServicer_to_server(floor, server)
        # Envoy routes through an ext_proc cluster only while its health check passes (the server's
        # overall status, "", is SERVING from the start)
        health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
        server.add_insecure_port(listen)
        await server.start()
        stop = lambda: server.stop(None)  # noqa: E731
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until the parent closes stdin
    await stop()


def _director(upstreams: list[str] = UPSTREAMS):
    """The service's director over the two upstreams, as ``Service.start`` sets it up."""
    from extproc.director import Director

    director = Director(_service_config("127.0.0.1:0", upstreams))
    director.set_upstreams(upstreams)
    return director


async def _ok(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """An upstream's health endpoint: 200 to anything."""
    while await reader.readline() not in (b"\r\n", b""):
        pass
    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
    await writer.drain()
    writer.close()


async def _in_process_answers(upstreams: list[str] = UPSTREAMS) -> list[pb.ProcessingResponse]:
    """The service's answer to one request, from its own handlers (what the floor replays)."""
    from extproc.handlers import ExternalProcessor

    proc = ExternalProcessor(_director(upstreams))
    return [r async for r in proc.Process(_aiter(request_messages(BODY)), None)]


async def _aiter(items):
    for x in items:
        yield x


# -- the client -------------------------------------------------------------------------------------

async def _drive(port: int, payloads: list[bytes]) -> None:
    """Send every payload, CONCURRENCY at a time, and each finished request's access-log entry."""
    async with grpc.aio.insecure_channel(f"{HOST}:{port}") as channel:
        stub = pb_grpc.ExternalProcessorStub(channel)
        logs: asyncio.Queue = asyncio.Queue()

        async def entries():
            while (msg := await logs.get()) is not None:
                yield msg

        als = als_pb2_grpc.AccessLogServiceStub(channel).StreamAccessLogs(entries())
        queue = iter(payloads)

        async def worker():
            for body in queue:
                out = [r async for r in stub.Process(iter(request_messages(body)))]
                logs.put_nowait(access_log(ticket_of(out)))

        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
        logs.put_nowait(None)
        await als


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def _ready(proc: subprocess.Popen, timeout: float = 60.0) -> None:
    """Wait, bounded, for the server's "ready" line."""
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout) or proc.stdout.readline().strip() != b"ready":
            raise RuntimeError(f"the server did not start (status {proc.poll()})")


def over_grpc(kind: str, payloads: list[bytes]) -> dict:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "bench.cpu", "--serve", kind, str(port)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            cwd=Path(__file__).resolve().parent.parent)
    try:
        _ready(proc)
        asyncio.run(_drive(port, payloads[:WARMUP]))
        cpu, t = _cpu_seconds(proc.pid), time.perf_counter()
        asyncio.run(_drive(port, payloads[WARMUP:]))
        wall, cpu = time.perf_counter() - t, _cpu_seconds(proc.pid) - cpu
    finally:
        proc.stdin.close()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    n = len(payloads) - WARMUP
    return {"setup": kind, "requests": n, "server_cpu_us_per_request": 1e6 * cpu / n, "requests_per_s": n / wall}


def in_process(payloads: list[bytes], profile: bool = False) -> tuple[dict, dict]:
    """The handlers without gRPC: CPU per request, and (``profile``) the time by package."""
    from extproc.als import AccessLogReceiver
    from extproc.handlers import ExternalProcessor

    director = _director()
    proc, receiver = ExternalProcessor(director), AccessLogReceiver(director)
    messages = [request_messages(b) for b in payloads]

    async def one(msgs):
        out = [r async for r in proc.Process(_aiter(msgs), None)]
        await receiver._consume(_aiter([access_log(ticket_of(out))]))

    async def run(batch):
        for msgs in batch:
            await one(msgs)

    asyncio.run(run(messages[:WARMUP]))
    prof = cProfile.Profile() if profile else None
    t = time.process_time()
    if prof:
        prof.enable()
    asyncio.run(run(messages[WARMUP:]))
    if prof:
        prof.disable()
    cpu = time.process_time() - t
    n = len(payloads) - WARMUP
    return {"setup": "in process", "requests": n, "server_cpu_us_per_request": 1e6 * cpu / n}, (_by_package(prof, n) if prof else {})


def _by_package(prof: cProfile.Profile, n: int) -> dict[str, float]:
    """Own time (not including callees) per package, µs a request: where the in-process time goes."""
    groups: dict[str, float] = defaultdict(float)
    for (path, _, func), (_, _, tottime, _, _) in pstats.Stats(prof).stats.items():  # type: ignore[attr-defined]
        if "/extproc/" in path:
            key = "extproc." + Path(path).stem
        elif "site-packages/" in path:
            key = path.split("site-packages/", 1)[1].split("/", 1)[0]
        elif path == "~":  # C functions: orjson, protobuf (upb), str methods ...
            key = "built-in: " + func.split(" of ")[-1].split("'")[1] if "'" in func else "built-in"
        else:
            key = "python: " + Path(path).stem
        groups[key] += tottime
    return {k: 1e6 * v / n for k, v in sorted(groups.items(), key=lambda kv: -kv[1]) if 1e6 * v / n >= 1.0}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m bench.cpu")
    p.add_argument("--serve", nargs="+", metavar="KIND PORT [UPSTREAM...]", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.serve:
        asyncio.run(_serve(a.serve[0], int(a.serve[1]), a.serve[2:] or None))
        return {}
    _configure_logs()  # for the in-process runs
    payloads = bodies(WARMUP + REQUESTS)
    runs: list[dict] = []
    for _ in range(REPEATS):  # interleaved, so that a slow minute of this VM hits every set-up alike
        runs += [over_grpc("floor", payloads), over_grpc("service", payloads), in_process(payloads)[0]]
    _, packages = in_process(payloads, profile=True)
    rows = []
    for setup in ("floor", "service", "in process"):
        mine = [r for r in runs if r["setup"] == setup]
        cpu = sorted(r["server_cpu_us_per_request"] for r in mine)
        row = {"setup": setup, "runs": len(mine), "requests_per_run": REQUESTS, "server_cpu_us_per_request": statistics.median(cpu),
               "min": cpu[0], "max": cpu[-1]}
        if "requests_per_s" in mine[0]:
            row["requests_per_s"] = statistics.median(r["requests_per_s"] for r in mine)
        rows.append(row)
    floor, service = rows[0]["server_cpu_us_per_request"], rows[1]["server_cpu_us_per_request"]
    result = {"benchmark": "cpu", "concurrency": CONCURRENCY, "body_bytes": [len(payloads[0]), len(payloads[-1])], "rows": rows,
              "grpc_share_of_service_cpu": floor / service, "in_process_profile_us_per_request": packages,
              "note": "server CPU per request, median (min, max) of interleaved runs; floor = gRPC with answers made beforehand; "
                      "profile = own time by package, under cProfile (slower than without)"}
    write("cpu", result)
    for r in rows:
        print(f"{r['setup']:12s} {r['server_cpu_us_per_request']:7.0f} µs CPU a request ({r['min']:.0f}–{r['max']:.0f})"
              + (f"  {r['requests_per_s']:6.0f} req/s" if "requests_per_s" in r else ""))
    print(f"gRPC's share of the service's CPU: {floor / service:.0%}")
    for k, v in list(packages.items())[:15]:
        print(f"  {k:40s} {v:7.1f} µs")
    return result


if __name__ == "__main__":
    main()
