"""The whole path through real Envoy with the official openai client, in both body modes."""

import asyncio
import collections
import concurrent.futures
import threading
import time
import urllib.request

import openai
import orjson
import pytest

from extproc.dev.stack import HOST, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

SYSTEM = "You are the support agent of a large airline. " + "Follow the policy below exactly. " * 120  # ~3.9K chars


def client(stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.base_url, api_key="unused", max_retries=0, timeout=60)


def post(stack, path: str, body: bytes, headers: dict | None = None) -> tuple[int, dict, bytes]:
    req = urllib.request.Request(f"http://{HOST}:{stack.ports.envoy}{path}", data=body, method="POST",
                                 headers={"content-type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def chat_once(c: openai.OpenAI, messages, stream: bool, **headers):
    """One chat call; returns (router that served it, cached tokens, reply text)."""
    if not stream:
        raw = c.chat.completions.with_raw_response.create(model="fake-model", messages=messages, extra_headers=headers or None)
        resp = raw.parse()
        return raw.headers["x-prefix-router-upstream"], resp.usage.prompt_tokens_details.cached_tokens, resp.choices[0].message.content
    raw = c.chat.completions.with_raw_response.create(
        model="fake-model", messages=messages, stream=True, stream_options={"include_usage": True}, extra_headers=headers or None
    )
    text, cached = "", None
    for chunk in raw.parse():
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
        if chunk.usage:
            cached = chunk.usage.prompt_tokens_details.cached_tokens
    return raw.headers["x-prefix-router-upstream"], cached, text


def test_the_service_reads_each_routers_workers_from_the_real_sglang_router(stack):
    """sglang-router's own worker list (GET /workers) tells the service how many workers each router
    balances, which sets that router's continuation knee: read within a health check, no read failing."""
    want = [len(w) for w in stack.ports.workers]
    assert want and all(n > 1 for n in want)  # one worker each would look like "not known"

    def counts() -> list[float]:
        return [stack.service_metric(0, "prefix_router_upstream_workers", upstream=a) for a in stack.router_addresses]

    wait_until(lambda: counts() == want, 15, "the routers' worker counts")
    assert stack.service_metric(0, "prefix_router_workers_read_failures_total") == 0


def test_get_without_body_is_routed_to_a_pool_router(stack):
    with urllib.request.urlopen(f"http://{HOST}:{stack.ports.envoy}/v1/models", timeout=30) as r:
        assert r.status == 200
        assert r.headers["x-prefix-router-upstream"] in stack.router_addresses
        assert orjson.loads(r.read())["data"]


@pytest.mark.parametrize("size", [1_000, 1_000_000, 8_000_000])
def test_body_sizes(stack, size):
    body = orjson.dumps({"model": "fake-model", "messages": [{"role": "user", "content": "q" * size}], "max_tokens": 2})
    status, headers, data = post(stack, "/v1/chat/completions", body)
    assert status == 200, data[:300]
    assert headers["x-prefix-router-upstream"] in stack.router_addresses
    assert orjson.loads(data)["usage"]["prompt_tokens"] >= size // 4


def test_body_beyond_envoys_buffer(stack):
    """12 MB: BUFFERED mode is bounded by Envoy's buffer (413 from Envoy); duplex streams it."""
    body = orjson.dumps({"model": "fake-model", "messages": [{"role": "user", "content": "q" * 12_000_000}], "max_tokens": 2})
    status, headers, data = post(stack, "/v1/chat/completions", body)
    if stack.envoy_config.stem == "buffered":
        assert status == 413
    else:
        assert status == 200 and headers["x-prefix-router-upstream"] in stack.router_addresses


@pytest.mark.parametrize("stream", [False, True])
def test_six_turn_conversation_stays_on_one_router_and_hits_the_cache(stack, stream):
    c = client(stack)
    messages = [{"role": "system", "content": SYSTEM + f" Session {stream}."}]
    routers, cached = [], []
    for turn in range(6):
        messages.append({"role": "user", "content": f"Question {turn}: what about my booking {turn * 7919}?"})
        router, hit, reply = chat_once(c, messages, stream)
        routers.append(router)
        cached.append(hit)
        messages.append({"role": "assistant", "content": reply})
    assert len(set(routers)) == 1 and routers[0] in stack.router_addresses
    assert all(h > 0 for h in cached[1:]), cached


def test_twenty_conversations_sharing_a_system_prompt_stick_to_their_router(stack):
    async def conversation(ac: openai.AsyncOpenAI, i: int) -> list[tuple[str, int]]:
        # Each conversation opens with its own 12K-character document, as a customer pasting an
        # itinerary would. Under the default cost rule a conversation leaves its router only when
        # that router's queue costs more than recomputing the conversation's own history elsewhere
        # (1,024 characters per request in flight): with 12K characters of its own, that takes
        # 12 more requests in flight there than elsewhere, which 20 conversations over two routers
        # never reach. A conversation whose own history is short may move, and should.
        messages = [{"role": "system", "content": SYSTEM + " Shared by all."},
                    {"role": "user", "content": f"Customer {i} itinerary: " + f"leg {i} booked, seat {i}A; " * 600}]
        seen = []
        for turn in range(3):
            messages.append({"role": "user", "content": f"I am customer {i}, request {turn}: " + f"details {i} " * 40})
            raw = await ac.chat.completions.with_raw_response.create(model="fake-model", messages=messages)
            resp = raw.parse()
            seen.append((raw.headers["x-prefix-router-upstream"], resp.usage.prompt_tokens_details.cached_tokens))
            messages.append({"role": "assistant", "content": resp.choices[0].message.content})
            await asyncio.sleep(0)
        return seen

    async def main():
        ac = openai.AsyncOpenAI(base_url=stack.base_url, api_key="unused", max_retries=0, timeout=60)
        try:
            return await asyncio.gather(*(conversation(ac, i) for i in range(20)))
        finally:
            await ac.close()

    results = asyncio.run(main())
    for seen in results:
        routers = [r for r, _ in seen]
        assert len(set(routers)) == 1 and routers[0] in stack.router_addresses, seen
        assert all(cached > 0 for _, cached in seen[1:]), seen


def non_pool_addresses(stack) -> list[str]:
    # Loopback only: Envoy's admin, a worker behind a router (bypassing it), a port nobody uses.
    return [f"{HOST}:{stack.ports.admin}", f"{HOST}:{stack.ports.workers[0][0]}", "127.0.0.2:9"]


def assert_served_by_pool(stack, status, headers, data):
    assert status == 200, data[:200]
    assert headers["x-prefix-router-upstream"] in stack.router_addresses
    assert orjson.loads(data)["system_fingerprint"].startswith("worker-")


def test_client_supplied_upstream_header_is_ignored_with_the_service_up(stack):
    body = orjson.dumps({"model": "fake-model", "messages": [{"role": "user", "content": "open proxy?"}]})
    mark = len(stack.wait_access_log(0, 10**9, timeout=0.3))
    for addr in non_pool_addresses(stack):
        status, headers, data = post(stack, "/v1/chat/completions", body, {"x-upstream-host": addr})
        assert_served_by_pool(stack, status, headers, data)
        with urllib.request.urlopen(urllib.request.Request(f"http://{HOST}:{stack.ports.envoy}/v1/models", headers={"x-upstream-host": addr}), timeout=30) as r:
            assert r.headers["x-prefix-router-upstream"] in stack.router_addresses
    routes = [e["route"] for e in stack.wait_access_log(mark, 6)]
    assert routes == ["pinned"] * 6


def test_fail_open_uses_the_fallback_cluster_and_never_the_client_header(stack):
    body = orjson.dumps({"model": "fake-model", "messages": [{"role": "user", "content": "service down"}]})
    stack.stop_service()
    try:
        mark = len(stack.wait_access_log(0, 10**9, timeout=0.3))
        for addr in non_pool_addresses(stack) + [None]:
            status, headers, data = post(stack, "/v1/chat/completions", body, {"x-upstream-host": addr} if addr else None)
            assert_served_by_pool(stack, status, headers, data)
        assert [e["route"] for e in stack.wait_access_log(mark, 4)] == ["fallback"] * 4
    finally:
        stack.start_service()
    # Routing resumes once Envoy's health check sees the service again.
    deadline = time.monotonic() + 10
    route = None
    while time.monotonic() < deadline and route != "pinned":
        mark = len(stack.wait_access_log(0, 10**9, timeout=0.2))
        post(stack, "/v1/chat/completions", body)
        route = stack.wait_access_log(mark, 1)[-1]["route"]
    assert route == "pinned"


def test_service_killed_under_load_requests_keep_succeeding(stack):
    """SIGKILL the service while 4 clients send; requests keep succeeding (fail open); restarted, it routes again.

    BUFFERED loses nothing: Envoy fails open before the body goes out. FULL_DUPLEX_STREAMED can fail
    open only until the first body chunk went to the service (an Envoy limit), so a crash costs the
    requests caught mid-body at the moment of the crash or before Envoy ejects the dead replica
    (outlier detection on the first refused connection): all within a second of the kill, at most
    two per client. A client whose request was cut sends its next at once (urllib, a connection per
    request), and that one can still be lost: on Envoy's other worker thread, whose own connection
    to the service is not yet seen closed, or on a new connection refused only after the first body
    chunk went out, before the ejection reached the thread. Locally 0-4 lost in 28 runs, never two
    for one client; once in CI 5 within 3 ms, so one client lost two. A graceful stop (SIGTERM)
    loses nothing in either mode (previous test).
    """
    clients = 4
    stop = threading.Event()
    results: list[tuple[float, int, str, int]] = []

    def load(i: int) -> None:
        n = 0
        while not stop.is_set():
            body = orjson.dumps({"model": "fake-model", "messages": [{"role": "user", "content": f"client {i} message {n}"}]})
            status, headers, data = post(stack, "/v1/chat/completions", body)
            results.append((time.monotonic(), status, headers.get("x-prefix-router-upstream", ""), i))
            n += 1

    with concurrent.futures.ThreadPoolExecutor(clients) as ex:
        futures = [ex.submit(load, i) for i in range(clients)]
        time.sleep(1.0)
        killed_at = time.monotonic()
        stack.kill_service()
        time.sleep(3.0)
        stack.start_service()
        time.sleep(2.0)
        stop.set()
        for f in futures:
            f.result(timeout=60)
    assert len(results) > 20
    failed = [r for r in results if r[1] != 200]
    if stack.envoy_config.stem == "buffered":
        assert not failed, f"{len(failed)} of {len(results)} failed: {failed[:5]}"
    else:
        per_client = collections.Counter(c for *_, c in failed)
        assert max(per_client.values(), default=0) <= 2, f"{len(failed)} of {len(results)} failed: {per_client}"
        assert all(killed_at <= t <= killed_at + 1.0 and status == 500 for t, status, _, _ in failed), failed
    assert all(u in stack.router_addresses for _, status, u, _ in results if status == 200)
    routes = [e["route"] for e in stack.wait_access_log(0, len(results))]
    assert "fallback" in routes and routes[-1] == "pinned"
