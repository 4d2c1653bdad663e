"""The run folder (retrain.run): `fit --output` replaces only what retrain wrote, swaps whole,
and cleans up after killed runs. Refusals are checked through the real CLI entry point
in-process (they happen before any work); one real subprocess run covers the rerun."""

import json
import os
import subprocess
from pathlib import Path

import pytest

from conftest import make_dataset, one_error_line, run_cli
from retrain import cli
from retrain.run import MARKER, RunWriter, is_run_folder


@pytest.fixture()
def data(tmp_path) -> Path:
    return make_dataset(tmp_path / "d", per_class=5)


def photos(root: Path) -> int:
    return sum(1 for _ in root.rglob("*.jpg"))


def fit_in_process(capsys, *args) -> tuple[int, str]:
    code = cli.main(["fit", *map(str, args), "-q"])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("target", ["image folder", "its parent", "inside it", "a class", "full folder",
                                    "a file", "current folder"])
def test_output_that_is_not_ours_is_refused_and_untouched(tmp_path, data, capsys, monkeypatch, target):
    full = tmp_path / "notes"
    full.mkdir()
    (full / "thesis.txt").write_text("years of work")
    (tmp_path / "notes.txt").write_text("keep me")
    monkeypatch.chdir(tmp_path)
    out = {"image folder": data, "its parent": tmp_path, "inside it": data / "run",
           "a class": data / "circle", "full folder": full, "a file": tmp_path / "notes.txt",
           "current folder": "."}[target]
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    code, err = fit_in_process(capsys, data, "-o", out)
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("error: --output ") and "Traceback" not in err
    after = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert after == before  # not one byte of the user's files changed, nothing added
    assert photos(data) == 15
    assert not (data / "run").exists()


def test_a_rerun_replaces_its_own_run_and_keeps_the_photos(tmp_path, data):
    out = tmp_path / "runs" / "d"
    first = run_cli("fit", data, "-o", out, "-q")
    assert (out / MARKER).is_file() and is_run_folder(out)
    created = json.loads((out / "report.json").read_text())["timings"]["total_s"]
    (out / "model.onnx").write_bytes(b"stale")  # the rerun must replace it
    second = run_cli("fit", data, "-o", out, "-q")
    assert "-> " in first.stdout and "-> " in second.stdout
    assert (out / "model.onnx").read_bytes()[:4] != b"stale" and created > 0
    assert photos(data) == 15
    assert sorted(p.name for p in out.parent.iterdir()) == ["d"]  # no .tmp- or .old- left


def test_an_empty_folder_and_a_run_from_before_the_marker_may_be_replaced(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "model.onnx").write_bytes(b"x")
    (legacy / "report.json").write_text(json.dumps({"retrain_version": "0.9"}))
    (legacy / "split.json").write_text("{}")
    for dest in (empty, legacy):
        with RunWriter(dest) as tmp:
            (tmp / "model.onnx").write_bytes(b"new")
        assert (dest / "model.onnx").read_bytes() == b"new" and (dest / MARKER).is_file()
    # A legacy-looking folder with one foreign file is not ours.
    (legacy / MARKER).unlink()
    (legacy / "mine.docx").write_bytes(b"user")
    assert not is_run_folder(legacy)


def test_leftovers_of_killed_runs_are_cleaned_and_a_live_one_is_not(tmp_path):
    dest = tmp_path / "run"
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / f".run.tmp-{dead.pid}"
    stale.mkdir()
    (stale / MARKER).write_text("{}")
    (stale / "model.onnx").write_bytes(b"0" * 1000)
    stale_old = tmp_path / f".run.old-{dead.pid}"
    stale_old.mkdir()
    (stale_old / MARKER).write_text("{}")
    not_ours = tmp_path / f".run.tmp-{dead.pid + 1}x"  # does not match the pattern
    not_ours.mkdir()
    live = tmp_path / f".run.tmp-{os.getppid()}"  # a process that is alive (pytest's parent)
    live.mkdir()
    (live / MARKER).write_text("{}")
    with RunWriter(dest) as tmp:
        (tmp / "labels.txt").write_text("a\nb\n")
    assert not stale.exists() and not stale_old.exists()
    assert not_ours.exists() and live.exists() and (dest / "labels.txt").is_file()


def test_a_failure_while_writing_keeps_the_old_run_whole(tmp_path):
    dest = tmp_path / "run"
    with RunWriter(dest) as tmp:
        (tmp / "model.onnx").write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with RunWriter(dest) as tmp:
            (tmp / "model.onnx").write_bytes(b"half")
            raise RuntimeError("crash while writing")
    assert (dest / "model.onnx").read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_output_graph_and_labels_never_overwrite_a_foreign_file(tmp_path, data, capsys):
    mine = tmp_path / "graph.onnx"
    mine.write_bytes(b"my own model, not retrain's")
    code, err = fit_in_process(capsys, data, "-o", tmp_path / "run", "--output_graph", mine)
    assert code == 2 and "--output_graph" in err and "did not write" in err
    assert mine.read_bytes() == b"my own model, not retrain's"
    assert not (tmp_path / "run").exists()  # refused before any work


def tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def test_a_full_disk_for_the_run_is_one_line_and_keeps_the_old_run(tmp_path, data):
    disk = tmp_path / "small"
    if not tmpfs(disk, "64k"):
        pytest.skip("cannot mount a tmpfs here (needs root and mount)")
    try:
        out = disk / "run"
        out.mkdir()
        (out / MARKER).write_text("{}")
        (out / "model.onnx").write_bytes(b"the old model")
        p = run_cli("fit", data, "-o", out, "-q", check=False)
        assert p.returncode == 2, p.stderr
        err = one_error_line(p.stderr)
        assert err.startswith("error: --output ") and "no space left on the disk" in err
        assert (out / "model.onnx").read_bytes() == b"the old model"
        assert sorted(x.name for x in disk.iterdir()) == ["run"]  # the half-written copy is gone
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


def test_a_read_only_output_folder_is_one_line(tmp_path, data):
    ro = tmp_path / "ro"
    if not tmpfs(ro, "1m"):
        pytest.skip("cannot mount a tmpfs here (needs root and mount)")
    try:
        subprocess.run(["mount", "-o", "remount,ro", str(ro)], check=True, capture_output=True)
        p = run_cli("fit", data, "-o", ro / "run", "-q", check=False)
        assert p.returncode == 2, p.stderr
        err = one_error_line(p.stderr)
        assert err.startswith("error: --output ") and "read-only file system" in err
    finally:
        subprocess.run(["umount", str(ro)], capture_output=True)
