"""Work directories of the stacks that benchmarks and tools start (extproc.dev.stack.work_dir)."""

from pathlib import Path

import pytest

from extproc.dev.stack import work_dir


def test_a_run_that_ends_well_leaves_no_work_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr("tempfile.tempdir", None)  # read TMPDIR again
    with work_dir("bench-x-") as work:
        assert work.parent == tmp_path and work.name.startswith("bench-x-")
        (work / "service-0.log").write_text("a log\n")
        (work / "nested").mkdir()
        (work / "nested" / "envoy.yaml").write_text("x: 1\n")
    assert not work.exists()
    assert list(tmp_path.iterdir()) == []


def test_a_failed_run_keeps_its_work_directory_and_names_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr("tempfile.tempdir", None)
    kept: Path | None = None
    with pytest.raises(TimeoutError):
        with work_dir("bench-x-") as work:
            kept = work
            (work / "service-0.log").write_text("why it failed\n")
            raise TimeoutError("the service: not ready after 30s")
    assert kept is not None and (kept / "service-0.log").read_text() == "why it failed\n"
    assert str(kept) in capsys.readouterr().err
