"""Several replicas through the real stack: Envoy, the service replicas, a real nats-server,
sglang-routers and fake workers.

    .venv/bin/python -m bench.replicas_e2e          → bench/results/replicas_e2e.json  (needs wrk for part 2)

1. **Hit ratio** with 1, 2 and 4 replicas (Envoy spreads the ext_proc streams over them, round
   robin; 2 and 4 share their view through NATS), the same requests: sessions replayed 8 at a time,
   each session's turns one after another; the hit ratio is read from the workers' reported
   ``cached_tokens``. Two seeds per workload, three runs each; ties are broken at random (the
   default) and threads interleave differently, so runs of one seed differ by several points:
   means over the six runs, their range and standard deviation are reported.
2. **Sessions followed over replicas** (``--sessions-only``): ``--move-evicted-sessions`` (the
   default) with Envoy spreading a conversation's turns over 2 synced replicas, each book following
   the peers' placements and notes: bench.e2e's SWE-agent case (2 routers x 2 workers, 32,000
   tokens per worker, 16 clients, the fake workers' costs of bench.e2e, seeds 3-5), where moving
   sessions off their evicting pile is worth most, through 1 replica and 2 replicas as they ship,
   and 2 replicas with ``--no-move-evicted-sessions`` (what replicas did before their books were
   shared: each book knew only the turns it decided, so they moved almost nothing). Sessions moved,
   responses read and the notes' fate summed over the replicas.
3. **Throughput and latency**: wrk (one thread, 10 s) through Envoy with 1 and with 2 synced
   service processes, against Envoy routing directly, at 1 and 16 connections; upstreams that
   answer at once (a second Envoy), so that the service is what is measured. Also the ext_proc
   messages per request in each body mode, from Envoy's own counters, and the sync bytes per
   decision from the service's.
"""

from __future__ import annotations

import concurrent.futures
import random
import statistics
import subprocess
import time
from pathlib import Path

import openai

from extproc.dev.stack import ENVOY_DIR, HOST, Ports, Stack, free_port, wait_until, work_dir

from . import e2e
from .common import RESULTS, write
from .overhead import direct_config, start_envoy, upstream_config, wrk, wrk_setup
from .sim.workloads import WORKLOADS

CASES = {
    "multi_turn": ({"sessions": 24, "turns": 5}, 6000),
    "shared_prefix": ({"groups": 8, "prompts": 8}, 8000),
    "structural_edits": ({"sessions": 16, "turns": 6}, 6000),
}
SEEDS = (3, 4)
REPEATS = 3  # runs per seed: thread timing and random tie-breaks move one run by several points
REPLICAS = (1, 2, 4)
CONCURRENCY = 8


def replay(stack: Stack, reqs) -> tuple[int, int, int]:
    """Sessions ``CONCURRENCY`` at a time, turns in order; returns (prompt, cached, failed)."""
    sessions: dict[str, list] = {}
    for r in reqs:
        sessions.setdefault(r.session, []).append(r)
    client = openai.OpenAI(base_url=stack.base_url, api_key="unused", max_retries=0, timeout=60)

    def run(turns) -> tuple[int, int, int]:
        prompt = cached = failed = 0
        for r in turns:
            try:
                out = client.chat.completions.create(model="fake-model", messages=r.messages, tools=r.tools or openai.NOT_GIVEN, max_tokens=4)
            except openai.APIError:
                failed += 1
                continue
            prompt += out.usage.prompt_tokens
            cached += out.usage.prompt_tokens_details.cached_tokens
        return prompt, cached, failed

    with concurrent.futures.ThreadPoolExecutor(CONCURRENCY) as ex:
        results = list(ex.map(run, sessions.values()))
    return tuple(sum(x[i] for x in results) for i in range(3))


def hit_ratios() -> list[dict]:
    rows = []
    for name, (kwargs, capacity) in CASES.items():
        for seed in SEEDS:
            reqs = WORKLOADS[name](random.Random(seed), **kwargs)
            for repeat in range(REPEATS):
                for n in REPLICAS:
                    rows.append(one_run(name, capacity, seed, repeat, n, reqs))
    return rows


def one_run(name: str, capacity: int, seed: int, repeat: int, n: int, reqs) -> dict:
    """One replay through a fresh stack of ``n`` replicas."""
    with work_dir(f"bench-replicas-{name}-{n}-") as work, Stack(
            Ports.free(2, 2, services=n), envoy_config=ENVOY_DIR / "duplex.yaml",
            worker_args=["--capacity-tokens", str(capacity), "--output-tokens", "4"], workdir=work) as stack:
        _wait_synced(stack, n)
        t = time.time()
        prompt, cached, failed = replay(stack, reqs)
        spent = time.time() - t
        decided = [_metric(stack, i, "prefix_router_decisions_total") for i in range(n)]
    print(f"{name} seed {seed} run {repeat} replicas {n}: hit {cached / prompt:.3f}, failed {failed}, decisions per replica {decided}", flush=True)
    return {"workload": name, "seed": seed, "repeat": repeat, "replicas": n, "requests": len(reqs), "hit_ratio": cached / prompt,
            "failed": failed, "decisions_per_replica": decided, "seconds": spent}


SESSION_SEEDS = (3, 4, 5)
SESSION_CLIENTS = 16
SESSION_VARIANTS = {"1 replica": (1, ()), "2 replicas": (2, ()), "2 replicas, --no-move-evicted-sessions": (2, ("--no-move-evicted-sessions",))}
NOTE_RESULTS = (("evicted", "applied"), ("evicted", "unknown"), ("cached", "applied"), ("cached", "unknown"), ("moved", "applied"),
                ("moved", "unknown"), ("forwarded_report", "sent"), ("forwarded_report", "applied"))


def sessions_runs() -> list[dict]:
    """Part 2 (module doc): one row per seed and variant."""
    kwargs, capacity = e2e.CASES["sweagent"]
    capacity = e2e.worker_capacity(capacity, e2e.BASE)
    rows = []
    for seed in SESSION_SEEDS:
        prepared = e2e._prepared("sweagent", kwargs, seed)
        for label, (n, args) in SESSION_VARIANTS.items():
            with work_dir(f"bench-replicas-sessions-{n}-") as work, Stack(
                    Ports.free(2, 2, services=n), envoy_config=ENVOY_DIR / "duplex.yaml", worker_args=e2e.SIDE_BY_SIDE.args(capacity),
                    workdir=work, service_args=list(args)) as stack:
                _wait_synced(stack, n)
                out = e2e.drive(stack.base_url, prepared, SESSION_CLIENTS)
                total = lambda name, **labels: int(sum(_metric(stack, i, name, **labels) for i in range(n)))  # noqa: E731
                row = {"seed": seed, "variant": label, "replicas": n, "requests": len(prepared), "failed": out["failed"],
                       "hit_ratio": out["hit_ratio"], "latency_p90_s": out["latency_p90_s"],
                       "decisions_per_replica": [int(_metric(stack, i, "prefix_router_decisions_total")) for i in range(n)],
                       "session_moves": total("prefix_router_session_moves_total"),
                       "responses_read": total("prefix_router_observations_total", result="read"),
                       "notes": {f"{k} {r}": total("prefix_router_sync_session_notes_total", kind=k, result=r) for k, r in NOTE_RESULTS}}
            print(f"sweagent x{SESSION_CLIENTS} seed {seed} {label}: hit {row['hit_ratio']:.3f}, latency p90 {row['latency_p90_s'] * 1000:.0f} ms, "
                  f"moves {row['session_moves']}, read {row['responses_read']}, notes {row['notes']}, failed {row['failed']}", flush=True)
            rows.append(row)
    return rows


def sessions_summary(rows: list[dict]) -> list[dict]:
    out = []
    for label in SESSION_VARIANTS:
        mine = [r for r in rows if r["variant"] == label]
        hits = [r["hit_ratio"] for r in mine]
        out.append({"variant": label, "runs": len(mine), "hit_ratio_mean": statistics.mean(hits), "hit_ratio_min": min(hits), "hit_ratio_max": max(hits),
                    "latency_p90_mean_s": statistics.mean(r["latency_p90_s"] for r in mine),
                    "session_moves_mean": statistics.mean(r["session_moves"] for r in mine),
                    "responses_read_share": sum(r["responses_read"] for r in mine) / sum(r["requests"] for r in mine),
                    "failed": sum(r["failed"] for r in mine)})
    return out


def _metric(stack: Stack, i: int, name: str, **labels: str) -> float:
    return stack.service_metric(i, name, **labels)


def _wait_synced(stack: Stack, n: int) -> None:
    if n > 1:
        wait_until(lambda: all(_metric(stack, i, "prefix_router_sync_peers") == n - 1 and _metric(stack, i, "prefix_router_sync_warming") == 0
                               for i in range(n)), 30, "replicas synced")


def throughput(seconds: int = 10) -> dict:
    with wrk_setup("bench-replicas-wrk-") as (work, script):
        return _throughput(work, script, seconds)


def _throughput(work: Path, script: Path, seconds: int) -> dict:
    ups = [free_port(), free_port()]
    procs: list[subprocess.Popen] = []
    stacks: list[Stack] = []

    def envoy(name: str, cfg: dict, admin: int) -> None:
        procs.append(start_envoy(work, name, cfg, admin))

    rows = []
    try:
        ua = free_port()
        envoy("upstreams", upstream_config(ua, ups), ua)
        da, dl = free_port(), free_port()
        envoy("direct", direct_config(da, dl, ups), da)
        variants: dict[str, tuple[str, Stack | None]] = {"envoy-direct": (f"http://{HOST}:{dl}/v1/chat/completions", None)}
        for mode, n in (("duplex", 1), ("duplex", 2), ("buffered", 1)):
            ports = Ports.free(2, 0, services=n)
            ports.routers = ups
            s = Stack(ports, envoy_config=ENVOY_DIR / f"{mode}.yaml", workdir=work / f"{mode}-{n}", service_args=["--health-interval-secs", "5"])
            if s.sync:
                s.start_nats()
            for i in range(n):
                s.start_service(i)
            s.start_envoy()
            _wait_synced(s, n)
            stacks.append(s)
            variants[f"envoy+prefix-router {mode} x{n}"] = (f"{s.base_url}/chat/completions", s)
        for connections in (1, 16):
            for name, (url, s) in variants.items():
                wrk(url, connections, 2, script)  # warm up
                before = _stack_counters(s)
                rows.append({"path": name, **wrk(url, connections, seconds, script)})
                after = _stack_counters(s)
                if s is not None:
                    d = {k: after[k] - before[k] for k in after}
                    per = max(1.0, d["requests"])
                    rows[-1].update({"ext_proc_messages_per_request": (d["sent"] + d["received"]) / per,
                                     "sync_bytes_sent_per_decision": d["sync_bytes"] / max(1.0, d["decisions"]),
                                     "sync_messages_sent_per_decision": d["sync_messages"] / max(1.0, d["decisions"])})
                print(f"{name:34s} c={connections:<3d} {rows[-1]['rps']:8.0f} req/s  p50 {rows[-1]['p50_ms']:.2f} ms  p99 {rows[-1]['p99_ms']:.2f} ms", flush=True)
    finally:
        for s in stacks:
            s.stop()
        for p in procs:
            p.terminate()
            p.wait(10)
    base = {r["connections"]: r for r in rows if r["path"] == "envoy-direct"}
    for r in rows:
        r["added_p50_ms"] = r["p50_ms"] - base[r["connections"]]["p50_ms"]
        r["throughput_vs_direct"] = r["rps"] / base[r["connections"]]["rps"]
    one = next(r for r in rows if r["path"] == "envoy+prefix-router duplex x1" and r["connections"] == 16)
    two = next(r for r in rows if r["path"] == "envoy+prefix-router duplex x2" and r["connections"] == 16)
    return {"rows": rows, "two_over_one_processes_at_16": two["rps"] / one["rps"]}


def _stack_counters(s: Stack | None) -> dict:
    if s is None:
        return {}
    n = len(s.ports.services)
    return {"sent": s.envoy_counter("^http.ingress.ext_proc.stream_msgs_sent$"),
            "received": s.envoy_counter("^http.ingress.ext_proc.stream_msgs_received$"),
            "requests": s.envoy_counter("^http.ingress.downstream_rq_completed$"),
            "decisions": sum(_metric(s, i, "prefix_router_decisions_total") for i in range(n)),
            "sync_bytes": sum(_metric(s, i, "prefix_router_sync_bytes_total", direction="sent") for i in range(n)),
            "sync_messages": sum(_metric(s, i, "prefix_router_sync_messages_total", direction="sent") for i in range(n))}


def summarize(rows: list[dict]) -> list[dict]:
    """Per workload and replica count: the mean over every run (seeds x repeats), its range and
    standard deviation, and the difference from one replica's mean in points."""
    out = []
    for name in CASES:
        one = statistics.mean(r["hit_ratio"] for r in rows if r["workload"] == name and r["replicas"] == 1)
        for n in REPLICAS:
            hits = [r["hit_ratio"] for r in rows if r["workload"] == name and r["replicas"] == n]
            out.append({"workload": name, "replicas": n, "runs": len(hits), "hit_ratio_mean": statistics.mean(hits),
                        "hit_ratio_min": min(hits), "hit_ratio_max": max(hits), "hit_ratio_stdev": statistics.stdev(hits) if len(hits) > 1 else 0.0,
                        "loss_points_mean": 100 * (one - statistics.mean(hits)),
                        "failed": sum(r["failed"] for r in rows if r["workload"] == name and r["replicas"] == n)})
    return out


def main(argv: list[str] | None = None) -> dict:
    import argparse
    import json

    p = argparse.ArgumentParser(prog="python -m bench.replicas_e2e")
    p.add_argument("--throughput-only", action="store_true", help="keep the hit-ratio rows of the last run")
    p.add_argument("--sessions-only", action="store_true", help="run part 2 only (sessions followed over replicas), keep the rest of the last run")
    a = p.parse_args(argv)
    if a.sessions_only:
        result = json.loads((RESULTS / "replicas_e2e.json").read_text())
        result.pop("machine", None)
        rows = sessions_runs()
        result["sessions"] = {"workload": "sweagent", "clients": SESSION_CLIENTS, "seeds": list(SESSION_SEEDS), "rows": rows, "summary": sessions_summary(rows)}
        print(f"wrote {write('replicas_e2e', result)}")
        return result
    if a.throughput_only:
        result = json.loads((RESULTS / "replicas_e2e.json").read_text())
        result.pop("machine", None)
        result["throughput"] = throughput()
        print(f"wrote {write('replicas_e2e', result)}")
        return result
    rows = hit_ratios()
    result = {"benchmark": "replicas_e2e", "seeds": list(SEEDS), "repeats": REPEATS, "concurrency": CONCURRENCY, "rows": rows, "summary": summarize(rows)}
    write("replicas_e2e", result)
    rows = sessions_runs()
    result["sessions"] = {"workload": "sweagent", "clients": SESSION_CLIENTS, "seeds": list(SESSION_SEEDS), "rows": rows, "summary": sessions_summary(rows)}
    write("replicas_e2e", result)
    result["throughput"] = throughput()
    print(f"wrote {write('replicas_e2e', result)}")
    return result


if __name__ == "__main__":
    main()
