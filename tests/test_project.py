"""Project wiring: CI runs exactly the README's test command; `make run`'s stack starts and stops cleanly."""

import os
import re
import signal
import subprocess
import sys
import time

import openai
import pytest

from extproc.dev.stack import ROOT, listening_pid, scrape, wait_until


def test_ci_runs_the_readme_test_command(tmp_path):
    """Run .ci/run with a recording `make` first on PATH: it must run exactly `make test`, the
    command the README gives, and fail when that command fails."""
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"```sh\n(.*?)```", readme, re.S).group(1)
    test_command = next(l.split("#")[0].strip() for l in block.splitlines() if "test" in l.split("#")[0])
    assert test_command == "make test"
    record = tmp_path / "calls"
    fake = tmp_path / "make"
    fake.write_text(f'#!/bin/sh\necho "make $*" >> {record}\nexit ${{FAKE_MAKE_STATUS:-0}}\n')
    fake.chmod(0o755)
    env = dict(os.environ, PATH=f"{tmp_path}:{os.environ['PATH']}", CI="true")
    r = subprocess.run(["bash", str(ROOT / ".ci/run")], env=env, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    assert record.read_text().splitlines() == [test_command]
    r = subprocess.run(["bash", str(ROOT / ".ci/run")], env={**env, "FAKE_MAKE_STATUS": "3"}, capture_output=True, text=True, timeout=60)
    assert r.returncode != 0


@pytest.mark.integration
@pytest.mark.timeout(180)
def test_stack_command_serves_then_stops_everything_on_sigterm(tmp_path):
    """What `make run` runs (on free ports here): prints the base URL, serves, leaves no process behind."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "extproc.dev.stack", "--free-ports", "--workdir", str(tmp_path), "--", "--log-level", "debug"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
    )
    try:
        base = None
        deadline = time.monotonic() + 120
        lines = []
        while time.monotonic() < deadline and base is None:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if line.startswith("OpenAI base URL: "):
                base = line.split(": ", 1)[1].strip()
        assert base, "".join(lines)
        c = openai.OpenAI(base_url=base, api_key="unused", max_retries=0, timeout=30)
        r = c.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": "hello"}])
        assert r.system_fingerprint.startswith("worker-")
        # the flags after -- reached the service: at debug it logs each decision
        def service_logs() -> str:
            return "".join(p.read_text() for p in tmp_path.glob("service-*.log"))

        deadline = time.monotonic() + 5
        while '"decision"' not in service_logs() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert '"event": "decision"' in service_logs()
        # two service replicas synced through a nats-server of the stack's own
        assert service_logs().count('"event": "sync_connected"') == 2
        # 4 workers, 2 routers, NATS, 2 service replicas and Envoy run with the workdir as their cwd
        assert len(_in(tmp_path)) >= 10
        # a router killed: the stack says so, keeps serving through the rest, and restarts it
        said = _read_until(proc, "routers ", lines=lines, timeout=10)
        routers = said.split("routers ", 1)[1].strip().split(", ")
        replica_metrics = re.findall(r"\(metrics (http://[^)]+)\)", said)
        assert len(replica_metrics) == 2
        assert "nats://" in _read_until(proc, "share their view through NATS", lines=lines, timeout=10)
        os.kill(listening_pid(int(routers[0].rsplit(":", 1)[1])), signal.SIGKILL)
        said = _read_until(proc, "router-", "exited", lines=lines, timeout=30)
        assert "the rest keeps serving" in said
        # each replica learns of the crash from its own first request sent there (a refused connection
        # ejects it at once) or from its health checks, whichever comes first: at most one failure a
        # replica (which request meets the dead router first is chance: ties break at random, and
        # Envoy picks the replica); once both have taken it out, everything goes to the live one
        outcomes = []
        for i in range(8):
            try:
                outcomes.append(bool(c.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": f"while a router is down {i}"}]).choices))
            except openai.APIStatusError:
                outcomes.append(False)
        assert outcomes.count(False) <= len(replica_metrics), outcomes
        wait_until(lambda: all(scrape(u, "prefix_router_upstream_healthy", upstream=routers[0]) == 0 for u in replica_metrics), 30,
                   "both replicas to take the dead router out")
        for i in range(5):
            assert c.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": f"after it is out {i}"}]).choices
        assert "restarted" in _read_until(proc, "router-", "restarted", lines=lines, timeout=60)
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        rest = proc.stdout.read()
        assert "stopped." in rest
    finally:
        if proc.poll() is None:
            proc.kill()
    # every process the stack started ran with the workdir as cwd; none is left
    time.sleep(0.5)
    assert not _in(tmp_path)


def _read_until(proc, *words: str, lines: list, timeout: float) -> str:
    """The first line of the stack's output holding every word (the stack prints one per event)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if all(w in line for w in words):
            return line
    raise AssertionError("".join(lines))


def _in(folder) -> list[str]:
    """Processes whose working directory is ``folder``."""
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.readlink(f"/proc/{pid}/cwd") == str(folder):
                out.append(pid)
        except OSError:
            pass
    return out
