"""Active health checks: each upstream on its own clock; a hung router is out within a stated bound."""

import asyncio
import time

import aiohttp
from aiohttp import web

from extproc.config import build
from extproc.director import Director
from extproc.health import HealthChecker


async def serve(routes: dict) -> tuple[web.AppRunner, str]:
    """An HTTP server on a free loopback port answering ``routes`` (path: handler); its runner and address."""
    app = web.Application()
    for path, handler in routes.items():
        app.router.add_get(path, handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"127.0.0.1:{site._server.sockets[0].getsockname()[1]}"


async def test_a_hung_router_delays_no_other_check_and_is_out_within_the_bound():
    # a router that accepts connections and never answers
    async def hang(reader, writer):
        await asyncio.sleep(3600)

    hung = await asyncio.start_server(hang, "127.0.0.1", 0)
    hung_addr = f"127.0.0.1:{hung.sockets[0].getsockname()[1]}"
    async def ok(request):
        return web.Response(text="ok")

    runner, good_addr = await serve({"/health": ok})

    interval, timeout, threshold = 0.1, 0.4, 3
    cfg = build({"upstreams": [good_addr, hung_addr], "health_interval_secs": str(interval),
                 "health_check_timeout_secs": str(timeout), "health_failure_threshold": str(threshold)}, env={})
    director = Director(cfg)
    director.set_upstreams([good_addr, hung_addr])
    checks: dict[str, int] = {good_addr: 0, hung_addr: 0}
    out_at = []
    record = director.record_check

    def counting(address, ok):
        checks[address] += 1
        changed = record(address, ok)
        if changed is False:
            out_at.append(time.monotonic())
        return changed

    director.record_check = counting
    started = time.monotonic()
    task = asyncio.create_task(HealthChecker(director, cfg).run())
    try:
        await asyncio.sleep(threshold * (timeout + interval) + 0.5)
    finally:
        task.cancel()
        hung.close()
        await runner.cleanup()
    bound = threshold * max(timeout, interval) + interval  # README's bound, with these settings
    assert out_at and out_at[0] - started <= bound + 0.3
    assert [u.address for u in director.upstreams() if u.healthy] == [good_addr]
    # the good router kept its own pace: ~one check per interval, not one per hung timeout
    assert checks[good_addr] >= 10


def test_a_routers_worker_list_counts_its_healthy_workers():
    from extproc.upstream import MAX_WORKERS, healthy_workers

    # sglang-router 0.3.2's GET /workers, as it answered with three workers (fields trimmed)
    body = b'{"workers":[{"id":"e7","url":"http://127.0.0.1:20610","model_id":"fake-model","is_healthy":true,"load":0},' \
           b'{"id":"41","url":"http://127.0.0.1:30975","is_healthy":false,"load":0},{"id":"5a","url":"http://127.0.0.1:23631"}]}'
    assert healthy_workers(body) == 2  # the unhealthy one is not a batch; one that does not say is
    assert healthy_workers(b'{"workers":[]}') == 0
    assert healthy_workers(b'{"workers":[' + b",".join([b"{}"] * (MAX_WORKERS + 5)) + b"]}") == MAX_WORKERS
    for bad in (b"", b"not json", b"[1,2]", b'{"workers":3}', b'{"urls":["http://a"]}', b'{"workers":[1,"x",null]}'):
        assert healthy_workers(bad) in (None, 0), bad
    assert healthy_workers(b'{"workers":[1,"x",null]}') == 0  # entries that are not workers count for nothing
    assert healthy_workers(b'{"urls":["http://a"]}') is None


async def test_each_good_check_reads_the_routers_workers_and_a_bad_answer_counts_as_one():
    from extproc import metrics
    from extproc.health import MAX_WORKERS_BODY

    answer = {"status": 200, "body": b'{"workers":[{"is_healthy":true},{"is_healthy":true},{"is_healthy":true}]}', "hang": False}

    async def ok(request):
        return web.Response(text="ok")

    async def workers(request):
        if answer["hang"]:
            await asyncio.sleep(5)
        return web.Response(status=answer["status"], body=answer["body"])

    runner, addr = await serve({"/health": ok, "/workers": workers})
    cfg = build({"upstreams": [addr], "health_check_timeout_secs": "0.3"}, env={})
    director = Director(cfg)
    director.set_upstreams([addr])
    checker = HealthChecker(director, cfg)

    def failures(reason):
        return metrics.WORKERS_READ_FAILURES.labels(addr, reason)._value.get()

    def knee():
        return {u["address"]: u for u in director.explain("/v1/chat/completions", b'{"messages":[{"role":"user","content":"x"}]}')["upstreams"]}[addr]["continuation_knee"]

    try:
        async with aiohttp.ClientSession() as session:
            await checker.check_and_record(session, addr)
            assert director.pool.workers == {addr: 3} and knee() == 3 * cfg.continuation_knee
            answer["hang"] = True  # no answer in time: what the pool knew stays
            before = failures("unreachable")
            await checker.check_and_record(session, addr)
            assert director.pool.workers == {addr: 3} and failures("unreachable") == before + 1
            answer["hang"] = False
            for status, body, reason in ((404, b"", "status"), (200, b"<html>", "bad_body"), (200, b" " * (MAX_WORKERS_BODY + 1), "too_large")):
                answer.update(status=status, body=body)
                director.record_workers(addr, 3)
                before = failures(reason)
                await checker.check_and_record(session, addr)
                assert addr not in director.pool.workers and failures(reason) == before + 1, reason
                assert knee() == cfg.continuation_knee
            answer.update(status=200, body=b'{"workers":[{"is_healthy":true},{"is_healthy":false}]}')
            await checker.check_and_record(session, addr)
            assert director.pool.workers == {addr: 1}
            checker.reconfigure(build({"upstreams": [addr], "workers_endpoint": ""}, env={}))  # off: one worker each
            await checker.check_and_record(session, addr)
            assert director.pool.workers == {}
    finally:
        await runner.cleanup()
