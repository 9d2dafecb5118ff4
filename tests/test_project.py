"""Project wiring: CI runs exactly the README's test command; `make run`'s stack starts and stops cleanly."""

import os
import signal
import subprocess
import sys
import time

import openai
import pytest

from extproc.stack import ROOT


def test_ci_runs_the_readme_test_command():
    ci = [l for l in (ROOT / ".ci/run").read_text().splitlines() if l and not l.startswith("#")]
    assert ci[-1] == "make test"
    assert "make test" in (ROOT / "README.md").read_text()


@pytest.mark.integration
@pytest.mark.timeout(180)
def test_stack_command_serves_then_stops_everything_on_sigterm(tmp_path):
    """What `make run` runs (on free ports here): prints the base URL, serves, leaves no process behind."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "extproc.stack", "--free-ports", "--workdir", str(tmp_path)],
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
        # 4 workers, 2 routers, the service and Envoy run with the workdir as their cwd
        assert len(_in(tmp_path)) >= 8
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
