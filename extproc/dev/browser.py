"""A real headless browser on the status page: Debian's chromium driven by Playwright.

Playwright's own browser download does not work here (and is not wanted: the test should see what an
operator's Chromium sees), so it drives the system's ``/usr/bin/chromium`` (``make test`` installs
Debian's package when it is missing). The flags keep Chromium from calling Google's services, which
a closed network refuses many times a second.

``python -m extproc.dev.browser --screenshot docs/status.png`` starts the local stack (two synced
replicas, buffered mode, every response read for its cache hit), sends a few conversations through
Envoy and saves the page as the README shows it.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import tempfile
import urllib.request
from pathlib import Path
from typing import Iterator

import orjson

CHROMIUM_FLAGS = [
    "--no-sandbox",  # root in CI; the page under test is our own
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
]


def find_chromium() -> str:
    """PREFIX_ROUTER_CHROMIUM, else Debian's chromium; raises with the fix when there is none."""
    for path in (os.environ.get("PREFIX_ROUTER_CHROMIUM"), shutil.which("chromium"), "/usr/bin/chromium"):
        if path and Path(path).exists():
            return path
    raise FileNotFoundError("no chromium: `make test` installs Debian's package (apt-get install chromium), or set PREFIX_ROUTER_CHROMIUM")


@contextlib.contextmanager
def page(width: int = 1280, height: int = 900) -> Iterator["object"]:
    """A Playwright page in headless chromium, with every console error and page error collected
    in ``page.errors`` (a list of strings)."""
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory(prefix="prefix-router-chromium-") as profile, sync_playwright() as pw:
        ctx = pw.chromium.launch_persistent_context(
            profile, executable_path=find_chromium(), headless=True, args=CHROMIUM_FLAGS, viewport={"width": width, "height": height}
        )
        try:
            pg = ctx.pages[0] if ctx.pages else ctx.new_page()
            errors: list[str] = []
            pg.on("console", lambda m: errors.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
            pg.on("pageerror", lambda e: errors.append(f"page error: {e}"))
            pg.errors = errors  # type: ignore[attr-defined]
            yield pg
        finally:
            ctx.close()


def chat(base_url: str, messages: list[dict], timeout: float = 60.0) -> dict:
    """One chat completion through Envoy (stdlib only: the same call the tests make)."""
    body = orjson.dumps({"model": "default", "messages": messages, "max_tokens": 8})
    req = urllib.request.Request(f"{base_url}/chat/completions", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return orjson.loads(r.read())


def conversations(base_url: str, sessions: int = 6, turns: int = 3) -> int:
    """A few multi-turn conversations with a shared system prompt; returns the requests sent."""
    system = {"role": "system", "content": "You are a careful assistant for a hardware store. " * 20}
    sent = 0
    for s in range(sessions):
        msgs = [system]
        for t in range(turns):
            msgs.append({"role": "user", "content": f"Session {s}, question {t}: which drill for concrete? " * 5})
            answer = chat(base_url, msgs)
            msgs.append({"role": "assistant", "content": answer["choices"][0]["message"]["content"]})
            sent += 1
    return sent


def main(argv: list[str] | None = None) -> int:
    from .stack import ENVOY_DIR, Ports, Stack, work_dir

    p = argparse.ArgumentParser(prog="python -m extproc.dev.browser", description=__doc__.split("\n\n")[0])
    p.add_argument("--screenshot", default="docs/status.png", help="where to save the page (PNG)")
    a = p.parse_args(argv)
    # buffered, every response read: the picture shows the observed hit ratio too
    with work_dir("prefix-router-screenshot-") as work, Stack(
            Ports.free(routers=2, workers_per_router=2, services=2), envoy_config=ENVOY_DIR / "buffered.yaml",
            service_args=["--observe-sample", "1"], worker_args=["--output-tokens", "8"], workdir=work) as stack:
        conversations(stack.base_url, sessions=12, turns=3)
        with page(height=1000) as pg:
            pg.goto(stack.service_admin_url(0) + "/")
            pg.wait_for_selector("#upstreams tbody tr")
            pg.wait_for_selector("#peers tbody tr[data-peer]")
            pg.screenshot(path=a.screenshot, full_page=True)
            if pg.errors:  # type: ignore[attr-defined]
                raise SystemExit("\n".join(pg.errors))  # type: ignore[attr-defined]
    print(f"saved {a.screenshot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
