"""The process stack (real Envoy, the service, real sglang-routers, fake workers) as fixtures."""

from pathlib import Path

import pytest

from extproc.dev.stack import ENVOY_DIR, Ports, Stack


def _stack(tmp_path_factory, config: str) -> Stack:
    # Fake workers answer 8 tokens with a small per-token delay, so responses take real time.
    return Stack(
        Ports.free(routers=2, workers_per_router=2),
        envoy_config=ENVOY_DIR / f"{config}.yaml",
        worker_args=["--output-tokens", "8", "--token-delay", "0.002"],
        workdir=Path(tmp_path_factory.mktemp(f"stack-{config}")),
    )


@pytest.fixture(scope="module", params=["buffered", "duplex"])
def stack(request, tmp_path_factory):
    s = _stack(tmp_path_factory, request.param)
    s.start()
    try:
        yield s
    finally:
        s.stop()
