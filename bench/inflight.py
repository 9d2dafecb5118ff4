"""How accurate the in-flight load signal is under a streaming load, through the real stack.

    .venv/bin/python -m bench.inflight        → bench/results/inflight.json

The service counts a request in flight from its decision until Envoy's gRPC access log reports
the request finished. The truth is what the fake workers behind each router are serving at that
moment (their /stats). Streaming clients keep ~16 requests open; every 50 ms both are sampled.
Reported: mean and max absolute error per router during the load, and the count once it is over.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time

import openai

from extproc.dev.stack import ENVOY_DIR, Ports, Stack, http_get, work_dir

from .common import write


def service_inflight(stack: Stack) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    body = http_get(stack.service_admin_url() + "/metrics")[1].decode()
    out = {}
    for fam in text_string_to_metric_families(body):
        for s in fam.samples:
            if s.name == "prefix_router_inflight_requests":
                out[s.labels["upstream"]] = s.value
    return out


def true_inflight(stack: Stack) -> dict[str, float]:
    out = {}
    for r, addr in enumerate(stack.router_addresses):
        out[addr] = sum(json.loads(http_get(f"{u}/stats")[1])["inflight"] for u in stack.worker_urls(r))
    return out


async def load(stack: Stack, clients: int, seconds: float) -> int:
    ac = openai.AsyncOpenAI(base_url=stack.base_url, api_key="unused", max_retries=0, timeout=60)
    done = 0
    stop = time.monotonic() + seconds

    async def client(i: int) -> None:
        nonlocal done
        n = 0
        while time.monotonic() < stop:
            stream = await ac.chat.completions.create(
                model="fake-model", stream=True, messages=[{"role": "user", "content": f"client {i} request {n} " * 20}]
            )
            async for _ in stream:
                pass
            n += 1
            done += 1

    await asyncio.gather(*(client(i) for i in range(clients)))
    await ac.close()
    return done


def main() -> dict:
    errors: dict[str, list[float]] = {}
    with work_dir("bench-inflight-") as work, Stack(Ports.free(2, 2), envoy_config=ENVOY_DIR / "duplex.yaml",
                                                    worker_args=["--output-tokens", "20", "--token-delay", "0.02"], workdir=work) as stack:
        samples = []

        async def sample(until: float) -> None:
            while time.monotonic() < until:
                svc, true = await asyncio.to_thread(lambda: (service_inflight(stack), true_inflight(stack)))
                samples.append((svc, true))
                await asyncio.sleep(0.05)

        async def run() -> int:
            seconds = 10.0
            done, _ = await asyncio.gather(load(stack, 16, seconds), sample(time.monotonic() + seconds))
            return done

        requests = asyncio.run(run())
        time.sleep(1.0)
        after = service_inflight(stack)
    for svc, true in samples[2:]:  # the first samples race the load's start
        for addr, t in true.items():
            errors.setdefault(addr, []).append(abs(svc.get(addr, 0) - t))
    rows = [{"router": a, "mean_abs_error": statistics.mean(e), "max_abs_error": max(e), "samples": len(e)} for a, e in errors.items()]
    mean_true = statistics.mean(sum(t.values()) for _, t in samples[2:])
    result = {"benchmark": "inflight", "clients": 16, "requests": requests, "mean_true_inflight": mean_true,
              "rows": rows, "after_load": after}
    path = write("inflight", result)
    for r in rows:
        print(f"{r['router']}: mean |error| {r['mean_abs_error']:.2f}, max {r['max_abs_error']:.0f} over {r['samples']} samples")
    print(f"{requests} streamed requests, mean true in flight {mean_true:.1f}; after the load: {after}")
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
