"""The attacks of the [harden] review, replayed against the real stack: the service before the
hardening (a git checkout of it) and as it is now.

    .venv/bin/python -m bench.attacks [--before REV]      → bench/results/attacks.json

Each attack runs against Envoy (duplex config), the service, 2 sglang-routers over 1 fake worker
each, while a victim client sends a small chat request every 50 ms. For each: the service's
resident memory (before, peak, after), the share of Envoy's health checks of the service that
stayed green, how long the service's own admin endpoint took to answer (it shares the event loop,
so this is the loop's stall; the victim's latency also includes the fake worker that receives a
forwarded bomb), the victim's latency (p50/p99 against a quiet baseline), failures, requests that
failed open, and how many routers were still in the pool afterwards.

- json_bomb: 5 gzip bodies of ~16 KB that expand to 16 MiB of ``{},{},…``.
- partition_flood: 16 gzip bodies of ~8 KB whose ``model`` values are distinct 4 MB strings.
- insert_flood: 40 distinct 1M-character prompts (gzip, ~1 KB each) against --max-tree-size 2,000,000.
- forged_access_log: a peer sends access-log entries naming each router with status 503 and
  guessed tickets, three times a second for 3 s.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import statistics
import subprocess
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import orjson

from extproc.dev.stack import ENVOY_DIR, HOST, ROOT, Ports, Stack, http_get

from .common import percentiles, write

BEFORE = "a18d71f"  # the last commit before the [harden] work
CHAT = "/v1/chat/completions"


def rss_mb(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def post(stack: Stack, body: bytes, headers: dict | None = None, timeout: float = 60) -> tuple[int, float]:
    req = urllib.request.Request(f"http://{HOST}:{stack.ports.envoy}{CHAT}", data=body, method="POST",
                                 headers={"content-type": "application/json", **(headers or {})})
    t = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            r.read()
            status = r.status
    except urllib.error.HTTPError as e:
        status = e.code
    except OSError:
        status = 0
    return status, time.perf_counter() - t


def healthy_routers(stack: Stack) -> int:
    _, body = http_get(stack.service_admin_url() + "/metrics")
    return sum(1 for l in body.decode().splitlines() if l.startswith("prefix_router_upstream_healthy{") and l.endswith(" 1.0"))


def tree_chars(stack: Stack) -> int:
    _, body = http_get(stack.service_admin_url() + "/metrics")
    return int(sum(float(l.rsplit(" ", 1)[1]) for l in body.decode().splitlines() if l.startswith("prefix_router_tree_characters{")))


class Watch:
    """Samples the service's memory, Envoy's view of its health and the victim's requests."""

    def __init__(self, stack: Stack) -> None:
        self.stack, self.stop = stack, threading.Event()
        self.rss: list[float] = []
        self.health: list[bool] = []
        self.victim: list[tuple[int, float]] = []
        self.tree: list[int] = []
        self.loop_ms: list[float] = []  # how long the service's admin endpoint took: its event loop's stalls
        pid = stack.procs["service-0"].pid
        self.threads = [threading.Thread(target=self._sample, args=(pid,)), threading.Thread(target=self._victim)]

    def _sample(self, pid: int) -> None:
        while not self.stop.is_set():
            self.rss.append(rss_mb(pid))
            try:
                self.health.append(self.stack.service_healthy_in_envoy())
            except OSError:  # Envoy's admin did not answer in time: not green
                self.health.append(False)
            t = time.perf_counter()
            try:
                self.tree.append(tree_chars(self.stack))
                self.loop_ms.append((time.perf_counter() - t) * 1000)
            except OSError:  # the service's own admin listener stalled with its event loop
                self.loop_ms.append((time.perf_counter() - t) * 1000)
            time.sleep(0.1)

    def _victim(self) -> None:
        i = 0
        while not self.stop.is_set():
            self.victim.append(post(self.stack, orjson.dumps({"model": "fake-model", "messages": [{"role": "user", "content": f"victim {i}"}]}), timeout=30))
            i += 1
            time.sleep(0.05)

    def __enter__(self) -> "Watch":
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        time.sleep(1.0)  # what happens right after counts too
        self.stop.set()
        for t in self.threads:
            t.join(60)


def json_bomb(stack: Stack) -> None:
    body = gzip.compress(b'{"messages":[' + b",".join([b"{}"] * (16 * 1024 * 1024 // 3)) + b"]}")
    for _ in range(5):
        post(stack, body, {"content-encoding": "gzip"})


def partition_flood(stack: Stack) -> None:
    for i in range(16):
        doc = {"model": f"{i}-" + "m" * 4_000_000, "messages": [{"role": "user", "content": "hi"}]}
        post(stack, gzip.compress(orjson.dumps(doc)), {"content-encoding": "gzip"})


def insert_flood(stack: Stack) -> None:
    for i in range(40):
        doc = {"model": "fake-model", "messages": [{"role": "user", "content": f"{i} " + "z" * 1_000_000}]}
        post(stack, gzip.compress(orjson.dumps(doc)), {"content-encoding": "gzip"})


def forged_access_log(stack: Stack) -> None:
    from envoy.data.accesslog.v3 import accesslog_pb2
    from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc
    from google.protobuf import wrappers_pb2
    import grpc

    async def forge() -> None:
        async def entries():
            for round_ in range(9):
                log = []
                for router in stack.router_addresses:
                    e = accesslog_pb2.HTTPAccessLogEntry(request=accesslog_pb2.HTTPRequestProperties(
                        request_headers={"x-prefix-router-ticket": f"{round_}", "x-upstream-host": router}))
                    e.response.response_code.CopyFrom(wrappers_pb2.UInt32Value(value=503))
                    log.append(e)
                yield als_pb2.StreamAccessLogsMessage(http_logs=als_pb2.StreamAccessLogsMessage.HTTPAccessLogEntries(log_entry=log))
                await asyncio.sleep(0.33)

        async with grpc.aio.insecure_channel(f"{HOST}:{stack.ports.services[0]}") as ch:
            await als_pb2_grpc.AccessLogServiceStub(ch).StreamAccessLogs(entries())

    asyncio.run(forge())


ATTACKS = {"json_bomb": json_bomb, "partition_flood": partition_flood, "insert_flood": insert_flood, "forged_access_log": forged_access_log}


def summary(w: Watch, baseline: list[float], fallback: int, healthy_after: int) -> dict:
    lat = [t for s, t in w.victim if s == 200]
    return {
        "rss_mb": {"peak": round(max(w.rss), 1), "after": round(w.rss[-1], 1)},
        "envoy_health_green_share": round(sum(w.health) / len(w.health), 3),
        "victim_requests": len(w.victim),
        "victim_failures": sum(1 for s, _ in w.victim if s != 200),
        "victim_latency_ms": {k: round(v * 1000, 1) for k, v in percentiles(lat, (50, 99)).items()} if lat else {},
        "victim_baseline_ms": {k: round(v * 1000, 1) for k, v in percentiles(baseline, (50, 99)).items()},
        "failed_open": fallback,
        "service_event_loop_ms": {"p50": round(statistics.median(w.loop_ms), 1), "max": round(max(w.loop_ms), 1)} if w.loop_ms else {},
        "tree_characters_peak": max(w.tree) if w.tree else 0,
        "routers_healthy_after": healthy_after,
    }


def run_version(label: str, source: Path | None, workdir: Path) -> dict:
    out = {}
    for name, attack in ATTACKS.items():
        stack = Stack(Ports.free(2, 1), envoy_config=ENVOY_DIR / "duplex.yaml", workdir=workdir / f"{label}-{name}",
                      service_args=["--max-tree-size", "2000000"], debug_headers=False,
                      service_env={"PYTHONPATH": str(source)} if source else {}, admin_api=source is None)
        with stack:
            baseline = [post(stack, orjson.dumps({"model": "fake-model", "messages": [{"role": "user", "content": f"warm {i}"}]}))[1] for i in range(40)]
            rss_before = rss_mb(stack.procs["service-0"].pid)
            fallback0 = stack.envoy_counter("failure_mode_allowed")
            with Watch(stack) as w:
                attack(stack)
            row = summary(w, baseline, stack.envoy_counter("failure_mode_allowed") - fallback0, healthy_routers(stack))
            row["rss_mb"]["before"] = round(rss_before, 1)
            out[name] = row
            print(f"{label:6} {name:18} rss {row['rss_mb']['before']:.0f} -> peak {row['rss_mb']['peak']:.0f} -> {row['rss_mb']['after']:.0f} MB  "
                  f"health {row['envoy_health_green_share']:.2f}  victim p99 {row['victim_latency_ms'].get('p99')} ms "
                  f"(quiet {row['victim_baseline_ms']['p99']})  service loop max {row['service_event_loop_ms'].get('max')} ms  failures {row['victim_failures']}  failed open {row['failed_open']}  "
                  f"tree peak {row['tree_characters_peak']:,}  routers {row['routers_healthy_after']}/2", flush=True)
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m bench.attacks")
    p.add_argument("--before", default=BEFORE, help=f"the commit to measure as 'before' (default {BEFORE}; '' to skip)")
    a = p.parse_args(argv)
    result: dict = {"benchmark": "attacks", "attacks": list(ATTACKS), "before_commit": a.before or None}
    with tempfile.TemporaryDirectory(prefix="prefix-router-attacks-") as tmp:
        tmp_path = Path(tmp)
        if a.before:
            old = tmp_path / "before-src"
            subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "-q", "--detach", str(old), a.before], check=True)
            try:
                result["before"] = run_version("before", old, tmp_path)
            finally:
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old)], check=False)
        result["after"] = run_version("after", None, tmp_path)
    write("attacks", result)
    return result


if __name__ == "__main__":
    main()
