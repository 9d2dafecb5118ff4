"""The fake SGLang worker: its prefix cache, and its API as SGLang and OpenAI clients see it."""

import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer

from extproc.dev.fakeworker import BLOCK_CHARS, BLOCK_TOKENS, FakeWorker, PrefixCache


def test_cache_reports_the_leading_cached_run_only():
    c = PrefixCache(capacity_tokens=10_000)
    a = "A" * (BLOCK_CHARS * 4)
    assert c.lookup_and_insert(a) == (BLOCK_TOKENS * 4, 0)
    assert c.lookup_and_insert(a + "tail" * 40)[1] == BLOCK_TOKENS * 4
    # a change in the first block invalidates everything after it
    assert c.lookup_and_insert("B" + a[1:])[1] == 0


def test_cache_is_bounded_and_least_recently_used():
    c = PrefixCache(capacity_tokens=BLOCK_TOKENS * 4)
    x, y = "x" * (BLOCK_CHARS * 3), "y" * (BLOCK_CHARS * 3)
    c.lookup_and_insert(x)
    c.lookup_and_insert(y)  # pushes x's oldest blocks out
    assert c.lookup_and_insert(x)[1] == 0
    assert len(c._blocks) <= 4


@pytest.fixture
async def worker():
    w = FakeWorker("w0", output_tokens=3)
    client = TestClient(TestServer(w.app()))
    await client.start_server()
    yield w, client
    await client.close()


async def test_chat_reports_cached_tokens_on_the_second_turn(worker):
    w, client = worker
    msgs = [{"role": "system", "content": "s" * 400}, {"role": "user", "content": "hi"}]
    r1 = await (await client.post("/v1/chat/completions", json={"model": "m", "messages": msgs})).json()
    assert r1["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert r1["choices"][0]["message"]["role"] == "assistant" and r1["system_fingerprint"] == "w0"
    msgs += [r1["choices"][0]["message"], {"role": "user", "content": "more"}]
    r2 = await (await client.post("/v1/chat/completions", json={"model": "m", "messages": msgs})).json()
    assert r2["usage"]["prompt_tokens_details"]["cached_tokens"] > 0


async def test_streaming_with_usage(worker):
    _, client = worker
    resp = await client.post("/v1/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": True, "stream_options": {"include_usage": True}})
    assert resp.headers["content-type"].startswith("text/event-stream")
    events = [l[6:] for l in (await resp.text()).splitlines() if l.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [orjson.loads(e) for e in events[:-1]]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]) == " tok0 tok1 tok2"
    assert chunks[-1]["usage"]["completion_tokens"] == 3


async def test_generate_completions_and_info(worker):
    _, client = worker
    g = await (await client.post("/generate", json={"text": "t" * 200, "sampling_params": {"max_new_tokens": 2}})).json()
    assert g["meta_info"]["prompt_tokens"] == 50 and g["meta_info"]["completion_tokens"] == 2
    g = await (await client.post("/generate", json={"text": "t" * 200})).json()
    assert g["meta_info"]["cached_tokens"] == 48
    c = await (await client.post("/v1/completions", json={"prompt": "p", "max_tokens": 1})).json()
    assert c["choices"][0]["text"] == " tok0"
    assert (await client.get("/health")).status == 200
    info = await (await client.get("/get_server_info")).json()
    assert "model_path" not in info and "model_path" not in await (await client.get("/get_model_info")).json()
    assert (await (await client.get("/v1/models")).json())["data"][0]["id"] == "fake-model"
    assert (await client.post("/v1/chat/completions", data=b"{bad")).status == 400


async def test_both_metadata_paths_sglang_router_asks(worker):
    _, client = worker
    for path in ("/model_info", "/get_model_info", "/server_info", "/get_server_info"):
        r = await client.get(path)
        assert r.status == 200, path
        assert "model_path" not in await r.json()  # with it, sglang-router would fetch a tokenizer


def test_http2_preface_probes_log_no_traceback(tmp_path):
    """sglang-router's HTTP/2 probe gets aiohttp's 400 without a traceback in the worker's log."""
    import socket
    import subprocess
    import sys
    import time

    from extproc.dev.stack import free_port, http_get, wait_until

    port = free_port()
    log = tmp_path / "worker.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "extproc.dev.fakeworker", "--port", str(port)], stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: http_get(f"http://127.0.0.1:{port}/health")[0] == 200, 20, "worker", proc)
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            assert s.recv(100).split(b" ")[1] == b"400"
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n")
            assert s.recv(100).split(b" ")[1] == b"404"
        time.sleep(0.3)
    finally:
        proc.terminate()
        proc.wait(10)
    assert "Traceback" not in log.read_text()


@pytest.mark.parametrize("serial", [True, False], ids=["serial", "side-by-side"])
async def test_serial_prefill_runs_one_prefill_at_a_time(serial):
    """``--serial-prefill``: four requests arriving together prefill one after another (as a GPU
    runs one prefill batch at a time, the simulator's ``serial_prefill``); without it they prefill
    side by side. Counted, not timed: the prefills in progress at once."""
    import asyncio

    running, most = 0, 0

    async def compute(seconds: float) -> None:
        nonlocal running, most
        running += 1
        most = max(most, running)
        try:
            await asyncio.sleep(0.05)
        finally:
            running -= 1

    w = FakeWorker("w0", output_tokens=1, prefill_delay_per_token=1e-6, serial_prefill=serial)
    w._compute = compute
    client = TestClient(TestServer(w.app()))
    await client.start_server()
    try:
        bodies = [{"model": "m", "messages": [{"role": "user", "content": f"{i} " * 200}]} for i in range(4)]
        answers = await asyncio.gather(*(client.post("/v1/chat/completions", json=b) for b in bodies))
        assert all(a.status == 200 for a in answers)
    finally:
        await client.close()
    assert most == (1 if serial else 4)


@pytest.mark.parametrize("limit", [0, 2], ids=["no-limit", "two"])
async def test_max_running_requests_makes_the_rest_wait_for_a_slot(limit):
    """``--max-running-requests N``: of five requests arriving together (streamed and not, OpenAI's
    and ``/generate``), N run at once, from their prefill to their last token, and the others wait
    for a slot (SGLang's batch limit, the simulator's ``Topology.batch``); without it all five run.
    Counted, not timed: the requests between prefill and answer at once."""
    import asyncio

    most = 0
    w = FakeWorker("w0", output_tokens=2, token_delay=0.02, max_running_requests=limit)
    prefill = w._prefill

    async def counted(text: str):
        nonlocal most
        most = max(most, w.stats.running)
        return await prefill(text)

    w._prefill = counted
    client = TestClient(TestServer(w.app()))
    await client.start_server()
    try:
        chat = {"model": "m", "messages": [{"role": "user", "content": "hello " * 50}]}
        sends = [client.post("/v1/chat/completions", json=chat), client.post("/v1/chat/completions", json={**chat, "stream": True}),
                 client.post("/v1/completions", json={"model": "m", "prompt": "hello " * 50}),
                 client.post("/generate", json={"text": "hello " * 50}), client.post("/v1/chat/completions", json=chat)]
        answers = await asyncio.gather(*sends)
        assert [a.status for a in answers] == [200] * 5
        assert all([await a.read() for a in answers])
        info = await (await client.get("/get_server_info")).json()
        stats = await (await client.get("/stats")).json()
    finally:
        await client.close()
    assert most == (limit or 5)
    assert stats["running"] == stats["inflight"] == 0
    assert info["max_running_requests"] == (limit or None)


def test_bench_e2e_starts_its_workers_serial_only_when_asked():
    """bench.e2e's ``--serial-prefill`` reaches the workers it starts: their command line makes a
    worker that runs one prefill at a time, and the default's makes one that does not."""
    from bench.e2e import SIDE_BY_SIDE, FakeWorkers
    from extproc.dev.fakeworker import worker_from_args

    def serial(args: list[str]) -> bool:
        return worker_from_args(["--port", "1", *args])[0]._prefill_turn is not None

    assert serial(FakeWorkers(serial_prefill=True).args(6000)) and not serial(SIDE_BY_SIDE.args(6000))
    assert FakeWorkers(serial_prefill=True).model().serial_prefill and not SIDE_BY_SIDE.model().serial_prefill
    # --batch N: the workers' own limit, none by default
    assert worker_from_args(["--port", "1", *FakeWorkers(batch=4).args(6000)])[0].max_running_requests == 4
    assert worker_from_args(["--port", "1", *SIDE_BY_SIDE.args(6000)])[0].max_running_requests == 0
