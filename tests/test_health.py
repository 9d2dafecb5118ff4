"""Active health checks: each upstream on its own clock; a hung router is out within a stated bound."""

import asyncio
import time

from aiohttp import web

from extproc.config import build
from extproc.director import Director
from extproc.health import HealthChecker


async def test_a_hung_router_delays_no_other_check_and_is_out_within_the_bound():
    # a router that accepts connections and never answers
    async def hang(reader, writer):
        await asyncio.sleep(3600)

    hung = await asyncio.start_server(hang, "127.0.0.1", 0)
    hung_addr = f"127.0.0.1:{hung.sockets[0].getsockname()[1]}"
    app = web.Application()
    async def ok(request):
        return web.Response(text="ok")

    app.router.add_get("/health", ok)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    good_addr = f"127.0.0.1:{site._server.sockets[0].getsockname()[1]}"

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
