"""The security properties through the real stack: who may talk to the service, what reaches it,
and that faults Envoy makes up itself or lost reports cannot hold the routing hostage."""

import asyncio
import concurrent.futures
import json
import signal
import threading
import time

import grpc
import orjson
import pytest
import yaml
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from extproc.dev.certs import make as make_certs
from extproc.dev.stack import ENVOY_DIR, HOST, Ports, Stack, http_get, render_envoy_config, wait_until

from .test_stack import post

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]
CHAT = "/v1/chat/completions"


def metric(stack: Stack, name: str) -> float:
    status, body = http_get(stack.service_admin_url() + "/metrics")
    assert status == 200
    return sum(s.value for f in text_string_to_metric_families(body.decode()) for s in f.samples if s.name == name)


def chat(text: str) -> bytes:
    return orjson.dumps({"model": "fake-model", "messages": [{"role": "user", "content": text}]})


def test_mtls_link_routes_and_reports_and_refuses_plaintext_peers(tmp_path):
    certs = make_certs(tmp_path / "tls")
    s = Stack(Ports.free(2, 1), envoy_config=ENVOY_DIR / "duplex-mtls.yaml", tls_dir=certs, workdir=tmp_path)
    with s:
        mark = len(s.envoy_access_log())
        for i in range(4):
            status, headers, _ = post(s, CHAT, chat(f"over mTLS {i}"))
            assert status == 200 and headers["x-prefix-router-upstream"] in s.router_addresses
        assert {e["route"] for e in s.wait_access_log(mark, 4)} == {"pinned"}  # decided by the service, not failed open
        # the access log reached it over the same link: nothing left in flight
        wait_until(lambda: metric(s, "prefix_router_inflight_requests") == 0, 5, "in-flight back to 0")
        # anyone else on the network: no TLS, or TLS without Envoy's certificate, is refused
        target = f"{HOST}:{s.ports.services[0]}"

        async def probe(creds):
            ch = grpc.aio.insecure_channel(target) if creds is None else grpc.aio.secure_channel(target, creds)
            async with ch:
                return await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=3)

        for creds in (None, grpc.ssl_channel_credentials((certs / "ca.pem").read_bytes())):
            with pytest.raises(grpc.aio.AioRpcError):
                asyncio.run(probe(creds))


class Recorder(pb_grpc.ExternalProcessorServicer):
    """An ext_proc server that records the headers Envoy sends and lets every request through."""

    def __init__(self) -> None:
        self.seen: list[dict[str, str]] = []

    async def Process(self, requests, context):  # noqa: N802
        body = b""
        async for r in requests:
            kind = r.WhichOneof("request")
            if kind == "request_headers":
                self.seen.append({h.key: (h.raw_value or h.value.encode()).decode() for h in r.request_headers.headers.headers})
                if r.request_headers.end_of_stream:
                    yield pb.ProcessingResponse(request_headers=pb.HeadersResponse())
            elif kind == "request_body":
                body += r.request_body.body
                if r.request_body.end_of_stream:
                    yield pb.ProcessingResponse(request_headers=pb.HeadersResponse())
                    yield pb.ProcessingResponse(request_body=pb.BodyResponse(response=pb.CommonResponse(body_mutation=pb.BodyMutation(
                        streamed_response=pb.StreamedBodyResponse(body=body, end_of_stream=True)))))
            elif kind == "request_trailers":
                yield pb.ProcessingResponse(request_trailers=pb.TrailersResponse())


def test_the_service_receives_only_the_headers_it_needs(tmp_path):
    """Through the shipped duplex config, with a recording ext_proc server in the service's place."""
    recorder, started, stop = Recorder(), threading.Event(), threading.Event()
    s = Stack(Ports.free(1, 1), envoy_config=ENVOY_DIR / "duplex.yaml", workdir=tmp_path)

    def serve():
        async def main():
            server = grpc.aio.server()
            pb_grpc.add_ExternalProcessorServicer_to_server(recorder, server)
            health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
            server.add_insecure_port(f"{HOST}:{s.ports.services[0]}")
            await server.start()
            started.set()
            while not stop.is_set():
                await asyncio.sleep(0.05)
            await server.stop(0)

        asyncio.run(main())

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        assert started.wait(10)
        s.start_workers()
        s.start_router(0)
        s.start_envoy()
        wait_until(s.service_healthy_in_envoy, 15, "the recorder healthy in Envoy")
        status, _, _ = post(s, CHAT, chat("what reaches the service"),
                            headers={"authorization": "Bearer sk-secret", "cookie": "session=1", "x-request-id": "client-id", "x-custom": "y"})
        assert status == 200
        assert recorder.seen
        for h in recorder.seen:
            assert set(h) <= {":path", "content-encoding", "x-request-id"}, h
            assert h.get("x-request-id") != "client-id"
        assert recorder.seen[-1][":path"] == CHAT
    finally:
        s.stop()
        stop.set()
        t.join(10)


def test_counts_reconcile_after_envoy_dies_with_requests_in_flight(tmp_path):
    """Envoy killed mid-stream never reports those requests; the service releases them after the
    grace instead of --inflight-timeout-secs (900 s)."""
    s = Stack(Ports.free(2, 1), worker_args=["--output-tokens", "400", "--token-delay", "0.02"],
              service_args=["--lost-report-grace-secs", "2"], workdir=tmp_path)
    with s:
        with concurrent.futures.ThreadPoolExecutor(6) as ex:
            futures = [ex.submit(post, s, CHAT, orjson.dumps({"model": "m", "stream": True, "messages": [{"role": "user", "content": f"long {i}"}]}))
                       for i in range(6)]
            wait_until(lambda: metric(s, "prefix_router_inflight_requests") >= 6, 10, "six streams in flight")
            s.procs["envoy"].send_signal(signal.SIGKILL)
            s.procs["envoy"].wait(10)
            killed_at = time.monotonic()
            for f in futures:
                try:
                    f.result(30)
                except Exception:  # noqa: BLE001 - their connection died with Envoy, however it shows
                    pass
        assert metric(s, "prefix_router_inflight_requests") >= 6  # nothing reported them
        # Envoy had opened no access-log stream yet (it does at the first finished request): its
        # silent health checks tell the service it is gone, 3 s, then the 2 s grace
        wait_until(lambda: metric(s, "prefix_router_inflight_requests") == 0, 10, "in-flight reconciled")
        assert time.monotonic() - killed_at < 3 + 2 + 2.5
        s.restart("envoy")  # and the service serves the new Envoy as before
        status, _, _ = post(s, CHAT, chat("after the restart"))
        assert status == 200


def test_envoys_own_overflow_503s_never_eject_a_router(tmp_path):
    """With the pinned cluster's circuit breaker at one request, concurrent requests get Envoy's own
    503 (flag UO): the routers stay in the pool (finding 5 ejected them one by one)."""
    s = Stack(Ports.free(2, 1), worker_args=["--output-tokens", "20", "--token-delay", "0.05"], workdir=tmp_path,
              service_args=["--ejection-failure-threshold", "1"])
    cfg = render_envoy_config(s.envoy_config, s.ports, debug_headers=True)
    pinned = next(c for c in cfg["static_resources"]["clusters"] if c["name"] == "sglang_routers_pinned")
    pinned["circuit_breakers"] = {"thresholds": [{"max_requests": 1, "max_pending_requests": 1, "max_connections": 1}]}
    tight = tmp_path / "tight.yaml"
    tight.write_text(yaml.safe_dump(cfg))
    s.envoy_config = tight
    s.debug_headers = False  # already rendered in
    with s:
        mark = len(s.envoy_access_log())
        with concurrent.futures.ThreadPoolExecutor(8) as ex:
            statuses = [st for st, _, _ in ex.map(lambda i: post(s, CHAT, chat(f"overflow {i}")), range(16))]
        entries = s.wait_access_log(mark, 16)
        assert 503 in statuses and any("UO" in e["flags"] for e in entries)  # Envoy's own overflow happened
        time.sleep(0.5)
        assert metric(s, "prefix_router_upstream_ejections_total") == 0
        assert metric(s, "prefix_router_upstream_healthy") == 2


def test_forged_access_log_entries_from_a_peer_change_nothing(tmp_path):
    """Finding 1: two forged entries naming each router with status 503 used to eject both."""
    from envoy.data.accesslog.v3 import accesslog_pb2
    from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc
    from google.protobuf import wrappers_pb2

    s = Stack(Ports.free(2, 1), workdir=tmp_path)
    with s:

        async def forge():
            async def entries():
                log = []
                for router in s.router_addresses:
                    for guess in ("1", f"{router}-1", "AAAAAAAAAAAAAAAAAAAAAA"):
                        e = accesslog_pb2.HTTPAccessLogEntry(request=accesslog_pb2.HTTPRequestProperties(
                            request_headers={"x-prefix-router-ticket": guess, "x-upstream-host": router}))
                        e.response.response_code.CopyFrom(wrappers_pb2.UInt32Value(value=503))
                        log.append(e)
                yield als_pb2.StreamAccessLogsMessage(http_logs=als_pb2.StreamAccessLogsMessage.HTTPAccessLogEntries(log_entry=log))

            async with grpc.aio.insecure_channel(f"{HOST}:{s.ports.services[0]}") as ch:
                await als_pb2_grpc.AccessLogServiceStub(ch).StreamAccessLogs(entries())

        asyncio.run(forge())
        assert metric(s, "prefix_router_unknown_tickets_total") == 6
        assert metric(s, "prefix_router_upstream_healthy") == 2
        status, _, _ = post(s, CHAT, chat("still routed"))
        assert status == 200
        assert json.loads(http_get(s.service_admin_url() + "/readyz")[1])["healthy"] == 2

