"""prefix-router against the real LiteLLM proxy's own routing, through real processes.

    .venv/bin/python -m bench.litellm        → bench/results/litellm.json, bench/results/litellm.png
                                                (needs `make litellm`)

The same requests (sessions replayed 8 at a time, each session's turns in order, streamed, with
usage) through each of:

- ``litellm <strategy>``: LiteLLM routing straight over the two sglang-router instances, listed as
  two deployments of one model, with each of its strategies: ``simple-shuffle`` (its default),
  ``least-busy``, ``usage-based-routing-v2``, ``latency-based-routing``, and ``simple-shuffle``
  with its ``prompt_caching`` pre-call check (pins a prompt whose message prefix it has seen
  succeed on a deployment);
- ``litellm → prefix-router``: LiteLLM with ``deploy/litellm/config.yaml`` (one deployment: Envoy),
  Envoy and two synced prefix-router replicas choosing the router;
- ``prefix-router``: the same without LiteLLM (clients straight to Envoy).

Hit ratio from the workers' reported ``cached_tokens``; TTFT is the time to the first streamed
content chunk as the client sees it. Two seeds per workload; the fake workers add 2 ms a token.
The extra hop: TTFT p50 of one request at a time through LiteLLM → Envoy against Envoy alone.
"""

from __future__ import annotations

import concurrent.futures
import random
import statistics
import time
from pathlib import Path

import openai

from extproc.dev.litellm import LiteLLM, shipped_config
from extproc.dev.stack import ENVOY_DIR, Ports, Stack, work_dir

from .common import RESULTS, percentiles, write
from .sim.workloads import WORKLOADS

CASES = {
    "multi_turn": ({"sessions": 24, "turns": 5}, 6000),
    "shared_prefix": ({"groups": 8, "prompts": 8}, 8000),
    "structural_edits": ({"sessions": 16, "turns": 6}, 6000),
}
SEEDS = (3, 4)
CONCURRENCY = 8
STRATEGIES = ("simple-shuffle", "least-busy", "usage-based-routing-v2", "latency-based-routing", "prompt-caching")
VARIANTS = [f"litellm {s}" for s in STRATEGIES] + ["litellm → prefix-router", "prefix-router"]


def direct_config(stack: Stack, strategy: str) -> dict:
    """LiteLLM over the sglang-routers themselves: one deployment per router."""
    settings: dict = {"routing_strategy": "simple-shuffle" if strategy == "prompt-caching" else strategy}
    if strategy == "prompt-caching":
        settings["optional_pre_call_checks"] = ["prompt_caching"]
    return {
        "model_list": [{"model_name": "fake-model", "litellm_params": {"model": "openai/fake-model", "api_base": f"http://{a}/v1", "api_key": "unused"}}
                       for a in stack.router_addresses],
        "router_settings": settings,
        "general_settings": {"master_key": "os.environ/LITELLM_MASTER_KEY"},
    }


def replay(base_url: str, api_key: str, reqs, concurrency: int = CONCURRENCY) -> dict:
    """Sessions ``concurrency`` at a time, turns in order, streamed."""
    sessions: dict[str, list] = {}
    for r in reqs:
        sessions.setdefault(r.session, []).append(r)
    client = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=120)

    def run(turns) -> list[tuple[float, int, int]]:
        out = []
        for r in turns:
            t = time.perf_counter()
            first = None
            usage = None
            try:
                for ch in client.chat.completions.create(model="fake-model", messages=r.messages, tools=r.tools or openai.NOT_GIVEN,
                                                         max_tokens=4, stream=True, stream_options={"include_usage": True}):
                    if first is None and ch.choices and ch.choices[0].delta.content:
                        first = time.perf_counter() - t
                    usage = ch.usage or usage
            except openai.APIError:
                out.append((-1.0, 0, 0))
                continue
            cached = usage.prompt_tokens_details.cached_tokens if usage and usage.prompt_tokens_details else 0
            out.append((first if first is not None else time.perf_counter() - t, usage.prompt_tokens if usage else 0, cached or 0))
        return out

    with concurrent.futures.ThreadPoolExecutor(concurrency) as ex:
        results = [x for part in ex.map(run, sessions.values()) for x in part]
    ok = [r for r in results if r[0] >= 0]
    ttft = percentiles([r[0] for r in ok], (50, 90))
    return {"requests": len(results), "failed": len(results) - len(ok), "hit_ratio": sum(r[2] for r in ok) / max(1, sum(r[1] for r in ok)),
            "ttft_p50_ms": ttft["p50"] * 1000, "ttft_p90_ms": ttft["p90"] * 1000}


def one_run(variant: str, name: str, capacity: int, seed: int, reqs) -> dict:
    with work_dir(f"bench-litellm-{name}-") as work, Stack(
            Ports.free(2, 2, services=2), envoy_config=ENVOY_DIR / "duplex.yaml",
            worker_args=["--capacity-tokens", str(capacity), "--output-tokens", "4", "--token-delay", "0.002"], workdir=work) as stack:
        if variant == "prefix-router":
            row = replay(stack.base_url, "unused", reqs)
        else:
            cfg = shipped_config(stack.ports.envoy) if variant == "litellm → prefix-router" else direct_config(stack, variant.split(" ", 1)[1])
            with LiteLLM(cfg, work) as proxy:
                row = replay(proxy.base_url, proxy.master_key, reqs)
    row.update({"variant": variant, "workload": name, "seed": seed})
    print(f"{name} seed {seed} {variant:34s} hit {row['hit_ratio']:.3f}  TTFT p50 {row['ttft_p50_ms']:.0f} ms p90 {row['ttft_p90_ms']:.0f} ms  failed {row['failed']}", flush=True)
    return row


def hop() -> dict:
    """TTFT p50 of one request at a time (no load): Envoy + prefix-router, and LiteLLM in front."""
    reqs = WORKLOADS["multi_turn"](random.Random(9), sessions=1, turns=40)  # one request at a time
    out = {}
    with work_dir("bench-litellm-hop-") as work, Stack(Ports.free(2, 2, services=2), envoy_config=ENVOY_DIR / "duplex.yaml",
                                                       worker_args=["--output-tokens", "4"], workdir=work) as stack:
        out["envoy+prefix-router"] = replay(stack.base_url, "unused", reqs, 1)["ttft_p50_ms"]
        with LiteLLM(shipped_config(stack.ports.envoy), work) as proxy:
            out["litellm→envoy+prefix-router"] = replay(proxy.base_url, proxy.master_key, reqs, 1)["ttft_p50_ms"]
        with LiteLLM(direct_config(stack, "simple-shuffle"), work) as proxy:
            out["litellm→sglang-router"] = replay(proxy.base_url, proxy.master_key, reqs, 1)["ttft_p50_ms"]
    out["litellm_hop_ms"] = out["litellm→envoy+prefix-router"] - out["envoy+prefix-router"]
    print(f"hop: {out}", flush=True)
    return out


def summarize(rows: list[dict]) -> list[dict]:
    out = []
    for name in CASES:
        for v in VARIANTS:
            mine = [r for r in rows if r["workload"] == name and r["variant"] == v]
            if mine:
                out.append({"workload": name, "variant": v, "hit_ratio_mean": statistics.mean(r["hit_ratio"] for r in mine),
                            "hit_ratio_min": min(r["hit_ratio"] for r in mine), "hit_ratio_max": max(r["hit_ratio"] for r in mine),
                            "ttft_p50_ms_mean": statistics.mean(r["ttft_p50_ms"] for r in mine),
                            "ttft_p90_ms_mean": statistics.mean(r["ttft_p90_ms"] for r in mine), "failed": sum(r["failed"] for r in mine)})
    return out


def table(summary: list[dict]) -> str:
    lines = ["| workload | " + " | ".join(VARIANTS) + " |", "|---|" + "---|" * len(VARIANTS)]
    for name in CASES:
        cells = []
        for v in VARIANTS:
            r = next((r for r in summary if r["workload"] == name and r["variant"] == v), None)
            cells.append(f"{r['hit_ratio_mean']:.2f} / {r['ttft_p50_ms_mean']:.0f} / {r['ttft_p90_ms_mean']:.0f}" if r else "-")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(summary: list[dict]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4))
    width = 0.8 / len(VARIANTS)
    for i, v in enumerate(VARIANTS):
        xs = [j + i * width for j in range(len(CASES))]
        rows = [next(r for r in summary if r["workload"] == n and r["variant"] == v) for n in CASES]
        axes[0].bar(xs, [r["hit_ratio_mean"] for r in rows], width, label=v)
        axes[1].bar(xs, [r["ttft_p90_ms_mean"] for r in rows], width, label=v)
    for ax, title in zip(axes, ("hit ratio (workers' cached tokens)", "TTFT p90 (ms)")):
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(CASES))], list(CASES))
        ax.set_title(title)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    path = RESULTS / "litellm.png"
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def main() -> dict:
    rows = []
    for name, (kwargs, capacity) in CASES.items():
        for seed in SEEDS:
            reqs = WORKLOADS[name](random.Random(seed), **kwargs)
            for v in VARIANTS:
                rows.append(one_run(v, name, capacity, seed, reqs))
    summary = summarize(rows)
    result = {"benchmark": "litellm", "litellm_version": _version(), "seeds": list(SEEDS), "concurrency": CONCURRENCY,
              "rows": rows, "summary": summary, "hop": hop()}
    print(table(summary))
    print(f"wrote {write('litellm', result)} and {plot(summary)}")
    return result


def _version() -> str:
    import subprocess

    from extproc.dev.litellm import find_litellm

    py = str(Path(find_litellm()).parent / "python")
    return subprocess.run([py, "-c", "import importlib.metadata as m; print(m.version('litellm'))"], capture_output=True, text=True).stdout.strip()


if __name__ == "__main__":
    main()
