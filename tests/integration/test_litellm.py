"""The originating setup: LiteLLM's real proxy in front of Envoy + prefix-router (two synced
replicas) in front of sglang-routers, with deploy/litellm/config.yaml as shipped."""

from __future__ import annotations

import time
import uuid

import openai
import pytest

from extproc.dev.litellm import LiteLLM, shipped_config
from extproc.dev.stack import ENVOY_DIR, Ports, Stack

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    work = tmp_path_factory.mktemp("litellm")
    stack = Stack(Ports.free(2, 2, services=2), envoy_config=ENVOY_DIR / "duplex.yaml",
                  worker_args=["--output-tokens", "8", "--token-delay", "0.002"], workdir=work / "stack")
    stack.start()
    proxy = LiteLLM(shipped_config(stack.ports.envoy), work)
    try:
        proxy.start()
        yield stack, proxy, openai.OpenAI(base_url=proxy.base_url, api_key=proxy.master_key, max_retries=0, timeout=60)
    finally:
        proxy.stop()
        stack.stop()


def routers_used(stack: Stack, mark: int, count: int) -> list[str]:
    return [e["upstream"] for e in stack.wait_access_log(mark, count)][:count]


def decisions(stack: Stack, reason: str) -> float:
    return sum(stack.service_metric(i, "prefix_router_decisions_total", reason=reason) for i in range(len(stack.ports.services)))


def conversation_start() -> list[dict]:
    return [{"role": "system", "content": f"{uuid.uuid4()} You answer questions about the sea. " * 20},
            {"role": "user", "content": "How deep is the Atlantic?"}]


def test_a_conversation_through_litellm_keeps_its_cache_hits(setup):
    stack, _, client = setup
    msgs = conversation_start()
    mark = len(stack.envoy_access_log())
    cached = []
    for turn in range(5):
        r = client.chat.completions.create(model="fake-model", messages=msgs)
        cached.append(r.usage.prompt_tokens_details.cached_tokens)
        msgs += [{"role": "assistant", "content": r.choices[0].message.content}, {"role": "user", "content": f"And then {turn}?"}]
    assert cached[0] == 0 and all(c > 0 for c in cached[1:]), cached
    assert cached == sorted(cached)  # each turn reuses more
    used = routers_used(stack, mark, 5)
    assert len(set(used)) == 1 and used[0] in stack.router_addresses


def test_a_streamed_conversation_through_litellm_keeps_its_cache_hits(setup):
    stack, _, client = setup
    msgs = conversation_start()
    cached = []
    for turn in range(3):
        chunks, usage = [], None
        for ch in client.chat.completions.create(model="fake-model", messages=msgs, stream=True, stream_options={"include_usage": True}):
            if ch.choices and ch.choices[0].delta.content:
                chunks.append(ch.choices[0].delta.content)
            usage = ch.usage or usage
        assert len(chunks) > 1  # streamed, not buffered on the way
        cached.append(usage.prompt_tokens_details.cached_tokens)
        msgs += [{"role": "assistant", "content": "".join(chunks)}, {"role": "user", "content": f"Why {turn}?"}]
    assert cached[0] == 0 and cached[1] > 0 and cached[2] > cached[1], cached


def test_a_client_supplied_upstream_header_through_litellm_routes_nowhere_else(setup):
    stack, _, client = setup
    worker = stack.worker_urls(0)[0].removeprefix("http://")  # a real listener, outside the pool
    mark = len(stack.envoy_access_log())
    for forged in (worker, "169.254.169.254:80"):
        r = client.chat.completions.create(model="fake-model", messages=conversation_start(),
                                           extra_headers={"x-upstream-host": forged, "x-prefix-router-ticket": "forged"})
        assert r.choices
    used = routers_used(stack, mark, 2)
    assert all(u in stack.router_addresses for u in used), used


def test_cache_salt_and_user_pass_through_litellm_to_the_routing(setup):
    stack, _, client = setup
    msgs = conversation_start()
    hits, misses = decisions(stack, "cache_hit"), decisions(stack, "cache_miss")
    for salt in ("tenant-a", "tenant-a"):
        client.chat.completions.create(model="fake-model", messages=msgs, user="alice", extra_body={"cache_salt": salt})
    time.sleep(0.2)
    assert decisions(stack, "cache_miss") == misses + 1 and decisions(stack, "cache_hit") == hits + 1
    # the same prompt under another salt is another partition: nothing to match
    client.chat.completions.create(model="fake-model", messages=msgs, user="bob", extra_body={"cache_salt": "tenant-b"})
    assert decisions(stack, "cache_miss") == misses + 2
