"""Observed cache hits through the real stack: Envoy in buffered mode (envoy/buffered.yaml,
allow_mode_override) and in duplex mode (envoy/duplex.yaml: the observing route and filter), the
service with --observe-sample 1, real sglang-routers, fake workers that report cached_tokens."""

from pathlib import Path

import openai
import orjson
import pytest

from extproc.dev.stack import ENVOY_DIR, Ports, Stack, http_get, wait_until

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module", params=["buffered", "duplex"])
def stack(request, tmp_path_factory):
    s = Stack(Ports.free(routers=2, workers_per_router=1), envoy_config=ENVOY_DIR / f"{request.param}.yaml", service_args=["--observe-sample", "1"],
              worker_args=["--output-tokens", "6"], workdir=Path(tmp_path_factory.mktemp(f"stack-observed-{request.param}")))
    s.start()
    try:
        yield s
    finally:
        s.stop()


def test_every_sampled_response_is_read_and_reaches_the_client_unchanged(stack):
    c = openai.OpenAI(base_url=stack.base_url, api_key="unused", max_retries=0, timeout=30)
    msgs = [{"role": "system", "content": "You answer questions about trains. " * 30}]
    prompt = cached = 0
    for turn in range(4):
        msgs.append({"role": "user", "content": f"Question {turn}: which line goes north?"})
        if turn % 2:
            r = c.chat.completions.create(model="fake-model", messages=msgs, max_tokens=6)
            text, u = r.choices[0].message.content, r.usage
        else:  # streamed, usage in the last event
            chunks = list(c.chat.completions.create(model="fake-model", messages=msgs, max_tokens=6, stream=True,
                                                    stream_options={"include_usage": True}))
            text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
            u = chunks[-1].usage
        assert text == " tok0 tok1 tok2 tok3 tok4 tok5"  # what the worker sent, untouched
        prompt += u.prompt_tokens
        cached += u.prompt_tokens_details.cached_tokens
        msgs.append({"role": "assistant", "content": text})
    assert cached > 0
    # the service read exactly what the client was told, for every request (a stream's end may reach
    # the service after its last bytes reached the client, or never: then the stream's close reads it)
    wait_until(lambda: stack.service_metric(0, "prefix_router_observations_total", result="read") == 4, 10, "four observations")
    assert stack.service_metric(0, "prefix_router_observed_prompt_tokens_total") == prompt
    assert stack.service_metric(0, "prefix_router_observed_cached_tokens_total") == cached
    assert stack.service_metric(0, "prefix_router_observations_total", result="read") == 4
    assert stack.service_metric(0, "prefix_router_prediction_error_count") == 4
    # every request was pinned (in duplex mode on the observing route), none failed open
    routes = [e["route"] for e in stack.wait_access_log(0, 4)]
    assert len(routes) == 4 and set(routes) == {"pinned_observed" if "duplex" in stack.envoy_config.name else "pinned"}


def test_a_client_cannot_select_the_observing_route(tmp_path):
    """The observing route is the service's to select: a client's own x-prefix-router-observe is
    removed before route selection, so with sampling off nothing is read and no made-up prediction
    reaches the metrics."""
    s = Stack(Ports.free(routers=1, workers_per_router=1), envoy_config=ENVOY_DIR / "duplex.yaml", workdir=tmp_path)
    with s:
        c = openai.OpenAI(base_url=s.base_url, api_key="unused", max_retries=0, timeout=30)
        for i in range(3):
            c.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": f"forged {i}"}], max_tokens=4,
                                      extra_headers={"x-prefix-router-observe": "0/1"})
        assert {e["route"] for e in s.wait_access_log(0, 3)} == {"pinned"}
        assert s.service_metric(0, "prefix_router_observations_total") == 0
        assert s.service_metric(0, "prefix_router_prediction_error_count") == 0


def test_stale_reports_cut_the_upstreams_budget_in_the_tree(tmp_path):
    """--observe-feedback through the real stack: a worker whose small cache has evicted a prompt
    reports far less cached than the tree predicts; the upstream's budget in the tree is cut
    (admin ``tree``), and the eviction sweep trims it."""
    import json
    import os
    import subprocess
    import sys

    s = Stack(Ports.free(routers=1, workers_per_router=1), envoy_config=ENVOY_DIR / "duplex.yaml",
              service_args=["--observe-sample", "1", "--observe-feedback"], worker_args=["--output-tokens", "2", "--capacity-tokens", "700"],
              workdir=tmp_path)
    with s:
        c = openai.OpenAI(base_url=s.base_url, api_key="unused", max_retries=0, timeout=30)

        def ask(topic: str) -> int:
            r = c.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": f"Tell me about {topic}. " * 100}], max_tokens=2)
            return r.usage.prompt_tokens_details.cached_tokens

        ask("trains")
        ask("boats")  # each prompt ~600 tokens: the worker's 700-token cache keeps one
        assert ask("trains") == 0  # the worker forgot it; the tree still holds it
        wait_until(lambda: s.service_metric(0, "prefix_router_tree_shrinks_total") >= 1, 10, "a stale report")
        env = dict(os.environ, PREFIX_ROUTER_ADMIN_TOKEN_FILE=str(s.admin_token_file))
        out = subprocess.run([sys.executable, "-m", "extproc", "tree", "--admin-grpc", f"127.0.0.1:{s.ports.service_admin_grpc[0]}", "--json"],
                             capture_output=True, text=True, timeout=30, env=env)
        tree = json.loads(out.stdout)
        (router,) = s.router_addresses
        assert 0 < tree["learnt_budget_per_upstream"][router] < tree["max_tree_size_per_upstream"]
        assert s.service_metric(0, "prefix_router_observations_total", result="read") == 3


def test_a_piled_session_moves_reading_only_the_responses_of_its_candidate_turns(tmp_path):
    """--move-evicted-sessions (on by default) through the real stack, in duplex mode, with --observe-sample off:
    four agent sessions on one system prompt pile onto one worker of one router (sglang-router's
    --cache-threshold 0.3), whose small cache evicts each one's history between its turns. The
    service reads the responses of the turns whose report may move a session (and no others: the
    observing route is taken by exactly the requests read), learns that a history was evicted, and
    moves that session to the other router."""
    s = Stack(Ports.free(routers=2, workers_per_router=2), envoy_config=ENVOY_DIR / "duplex.yaml",
              service_args=["--move-family-turns", "2"],  # sessions followed by default
              worker_args=["--output-tokens", "2", "--capacity-tokens", "2500"], workdir=tmp_path)
    with s:
        c = openai.OpenAI(base_url=s.base_url, api_key="unused", max_retries=0, timeout=30)
        system = {"role": "system", "content": "You are an agent. Use the tools to fix the bug. " * 25}  # 1,225 characters
        sessions = [[system, {"role": "user", "content": f"Task {name}: " + f"the {name} module fails. " * 20}] for name in ("zero", "alpha", "beta", "gamma")]
        # (the first two stand for sessions begun before the service followed any: the first stores the
        # system prompt, the second's match runs into the first's alone, which a continuation also does)
        sent = 0
        for turn in range(6):
            for msgs in sessions:
                r = c.chat.completions.create(model="fake-model", messages=msgs, max_tokens=2)
                sent += 1
                msgs += [{"role": "assistant", "content": r.choices[0].message.content},
                         {"role": "user", "content": f"Output of step {turn}: " + "line of tool output " * 70}]  # ~1,400 characters a turn
        wait_until(lambda: s.service_metric(0, "prefix_router_session_moves_total") >= 1, 10, "a session moved")
        read = s.service_metric(0, "prefix_router_observations_total", result="read")
        assert 0 < read < sent / 2
        routes = [e["route"] for e in s.wait_access_log(0, sent)]
        assert routes.count("pinned_observed") == read and routes.count("pinned") == sent - read
        # the pile: one worker served most turns; the moved session's, the other router
        served = [[orjson.loads(http_get(f"{u}/stats", timeout=10)[1])["requests"] for u in s.worker_urls(r)] for r in range(2)]
        assert max(max(w) for w in served) >= sent // 2 and min(sum(w) for w in served) >= 1
