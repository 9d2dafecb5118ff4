"""``prefix-router serve --processes N``: N replicas on consecutive ports, one view, one supervisor."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from extproc.dev.stack import listening_pid, scrape
from extproc.processes import replica_args, shifted
from extproc.config import build

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def free_run(n: int) -> int:
    """A port p with p .. p+n-1 all free on 127.0.0.1."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + n > 65535:
            continue
        socks = []
        try:
            for i in range(n):
                t = socket.socket()
                socks.append(t)
                t.bind(("127.0.0.1", base + i))
            return base
        except OSError:
            continue
        finally:
            for t in socks:
                t.close()
    raise RuntimeError("no run of free ports")


def metric(port: int, name: str) -> float:
    return scrape(f"http://127.0.0.1:{port}/metrics", name)


def wait_for(cond, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if cond():
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise AssertionError("not in time")


def test_replica_command_lines_shift_everylistening_pid():
    cfg = build({"upstreams": ["127.0.0.1:1"], "grpc_listen": "127.0.0.1:50051"}, env={})
    argv = replica_args(cfg, ["--upstream", "127.0.0.1:1"], 2, "nats://127.0.0.1:4222")
    assert argv[argv.index("--grpc-listen") + 1] == "127.0.0.1:50053"
    assert argv[argv.index("--admin-listen") + 1] == "127.0.0.1:9466"
    assert argv[argv.index("--admin-grpc-listen") + 1] == "127.0.0.1:9566"
    assert argv[argv.index("--processes") + 1] == "1" and "nats://127.0.0.1:4222" in argv
    assert shifted("[::1]:0", 3) == "[::1]:0"


def test_serve_processes_starts_synced_replicas_restarts_a_dead_one_and_stops_all(tmp_path):
    grpc, admin, admin_grpc = free_run(2), free_run(2), free_run(2)
    proc = subprocess.Popen(
        [sys.executable, "-m", "extproc", "serve", "--processes", "2", "--grpc-listen", f"127.0.0.1:{grpc}",
         "--admin-listen", f"127.0.0.1:{admin}", "--admin-grpc-listen", f"127.0.0.1:{admin_grpc}",
         "--upstream", "127.0.0.1:1", "--upstream", "127.0.0.1:2", "--shutdown-delay-secs", "0", "--log-format", "json",
         "--sync-heartbeat-secs", "0.2", "--sync-peer-timeout-secs", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=tmp_path, start_new_session=True,
    )
    try:
        # both replicas up, each on its own ports, connected to the nats-server started for them
        wait_for(lambda: all(metric(admin + i, "prefix_router_sync_peers") == 1 for i in (0, 1)), 30)
        assert all(metric(admin + i, "prefix_router_sync_connected") == 1 for i in (0, 1))
        victim = listening_pid(grpc + 1)
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: listening_pid(grpc + 1) not in (None, victim) and metric(admin + 1, "prefix_router_sync_peers") == 1, 30)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert "replica 1 exited" in proc.stderr.read().decode()
    for port in (grpc, grpc + 1, admin, admin + 1):  # every replica and the nats-server are gone
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0


def test_replicas_and_nats_go_when_the_supervisor_is_killed(tmp_path):
    grpc, admin, admin_grpc = free_run(2), free_run(2), free_run(2)
    proc = subprocess.Popen(
        [sys.executable, "-m", "extproc", "serve", "--processes", "2", "--grpc-listen", f"127.0.0.1:{grpc}",
         "--admin-listen", f"127.0.0.1:{admin}", "--admin-grpc-listen", f"127.0.0.1:{admin_grpc}",
         "--upstream", "127.0.0.1:1", "--shutdown-delay-secs", "0"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path,
    )
    try:
        wait_for(lambda: all(metric(admin + i, "prefix_router_sync_connected") == 1 for i in (0, 1)), 30)
        children = [listening_pid(grpc), listening_pid(grpc + 1)]
        proc.kill()  # no chance to pass anything on
        proc.wait(5)
        wait_for(lambda: all(not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z"
                             for pid in children), 30)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_processes_need_fixed_ports():
    out = subprocess.run([sys.executable, "-m", "extproc", "serve", "--processes", "2", "--grpc-listen", "127.0.0.1:0",
                          "--upstream", "127.0.0.1:1"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and "fixed port" in out.stderr
