"""The evaluation's simulator and policies on small inputs (the numbers themselves come from `make bench`)."""

import importlib
import random

from bench.sim.engine import ServiceModel, Sim, Topology, prepare
from bench.sim.policies import LiteLLM, Single, upper_policies
from bench.sim.workloads import WORKLOADS, Req


def test_every_benchmark_module_imports_and_make_bench_runs_each():
    from pathlib import Path

    names = sorted(p.stem for p in Path(__file__).resolve().parent.parent.joinpath("bench").glob("*.py") if p.stem not in ("__init__", "__main__", "common"))
    assert names
    listed = Path(__file__).resolve().parent.parent.joinpath("bench", "__main__.py").read_text()
    for name in names:
        importlib.import_module(f"bench.{name}")
        assert f'("{name}"' in listed, f"make bench does not run bench.{name}"


def test_every_policy_runs_every_request_once():
    prepared = prepare(WORKLOADS["multi_turn"](random.Random(1), sessions=6, turns=3))
    for name, policy in upper_policies().items():
        s = Sim(prepared, policy, Topology(routers=2, workers=2, capacity_tokens=20_000), ServiceModel(), seed=1).run()
        assert s["requests"] == len(prepared), name
        assert 0.0 <= s["hit_ratio"] <= 1.0 and s["ttft_p90_s"] >= s["ttft_p50_s"] > 0
    s = Sim(prepared, Single(), Topology(routers=1, workers=4, capacity_tokens=20_000), ServiceModel(), seed=1).run()
    assert s["requests"] == len(prepared) and s["hit_ratio"] > 0.5


def test_sessions_are_closed_loops():
    prepared = prepare(WORKLOADS["multi_turn"](random.Random(2), sessions=4, turns=4))
    sim = Sim(prepared, upper_policies()["round-robin"], Topology(routers=2, workers=1), ServiceModel(), seed=2)
    sim.run()
    turns: dict[str, int] = {}
    for p in sim.order:  # a session's turns arrive in order, one after the other
        assert len(p.req.messages) > turns.get(p.req.session, 0)
        turns[p.req.session] = len(p.req.messages)


def test_litellm_v1_semantics():
    class FakeSim:
        now = 0.0
        rng = random.Random(0)
        routers = [object()] * 4

    llm = LiteLLM()
    long = "x" * 5000  # >= 1024 tokens
    first = Req("s", [{"role": "system", "content": long}, {"role": "user", "content": "q1"}])
    p1 = prepare([first])[0]
    sim = FakeSim()
    r1 = llm.choose(p1, sim)
    llm.finished(p1, r1, sim)  # stored after the response
    turn2 = Req("s", first.messages + [{"role": "assistant", "content": "a1"}, {"role": "user", "content": "q2"}])
    assert llm.choose(prepare([turn2])[0], sim) == r1 and llm.last_reason == "cache_hit"  # found without its last 2
    four_more = Req("s", first.messages + [{"role": "tool", "content": str(i)} for i in range(4)])
    llm.choose(prepare([four_more])[0], sim)
    assert llm.last_reason == "random"  # more than 3 messages added: lost
    short = Req("t", [{"role": "user", "content": "short"}])
    ps = prepare([short])[0]
    llm.finished(ps, 2, sim)  # under 1024 tokens: never stored
    llm.choose(ps, sim)
    assert llm.last_reason == "random"
