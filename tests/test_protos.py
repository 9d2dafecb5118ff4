"""The generated code in extproc/api matches protos/ (run `make protos` after editing a .proto)."""

import subprocess
import sys

from extproc.dev.stack import ROOT


def test_generated_code_is_fresh(tmp_path):
    protos = sorted(p.relative_to(ROOT / "protos") for p in (ROOT / "protos").rglob("*.proto"))
    assert protos
    r = subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-I", str(ROOT / "protos"), f"--python_out={tmp_path}",
         f"--pyi_out={tmp_path}", f"--grpc_python_out={tmp_path}", *map(str, protos)],
        capture_output=True, text=True, timeout=60,
    )
    assert r.returncode == 0, r.stderr
    generated = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.py*"))
    assert generated
    for rel in generated:
        committed = ROOT / rel
        assert committed.exists(), f"{rel} is not committed: run make protos"
        assert committed.read_bytes() == (tmp_path / rel).read_bytes(), f"{rel} is stale: run make protos"
