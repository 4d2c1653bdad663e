"""`retrain export`: each form is a run folder the other commands take, and its agreement figures
are real (re-measured here, independently of the export)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from conftest import EXAMPLES, run_cli
from retrain.classifier import Classifier
from retrain.model import read_metadata


def _copy_run(run: Path, dst: Path) -> Path:
    """A private copy, so exports.json never lands in the session's shared run."""
    shutil.copytree(run, dst)
    return dst


@pytest.fixture(scope="module")
def int8_export(flowers_run, tmp_path_factory):
    root = tmp_path_factory.mktemp("deploy")
    run = _copy_run(flowers_run, root / "run")
    out = root / "int8"
    p = run_cli("export", run, "--format", "onnx-int8", "--output", out, "--calibration-images", "24",
                "--tolerance", "100")
    return run, out, p


def test_int8_export_is_a_verified_quantized_run_folder(int8_export):
    run, out, p = int8_export
    for f in ("model.onnx", "labels.txt", "split.json", "report.json"):
        assert (out / f).is_file(), f
    assert "validation" in p.stdout and "test" in p.stdout and "max prob diff" in p.stdout
    m = onnx.load(str(out / "model.onnx"))
    ops = {n.op_type for n in m.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert any(i.data_type == onnx.TensorProto.INT8 for i in m.graph.initializer)
    assert (out / "model.onnx").stat().st_size < 0.4 * (run / "model.onnx").stat().st_size
    meta = read_metadata(out)
    src = read_metadata(run)
    assert meta["format"] == "onnx-int8" and meta["labels"] == src["labels"]
    assert meta["mean"] == src["mean"] and meta["input_size"] == src["input_size"]
    assert meta["quantization"]["calibration_images"] == 24 and meta["quantization"]["quant_format"] == "qdq"
    rep = json.loads((out / "report.json").read_text())["export"]
    assert rep["within_tolerance"] and rep["source_sha256"] == meta["exported_from"]["sha256"]
    assert json.loads((run / "exports.json").read_text())["onnx-int8"]["path"] == str(out.resolve())


def test_agreement_figures_match_an_independent_rescore(int8_export):
    run, out, _ = int8_export
    report = json.loads((run / "report.json").read_text())
    split = json.loads((run / "split.json").read_text())
    root = Path(report["image_dir"])
    rec = json.loads((out / "report.json").read_text())["export"]["verified_on"]
    for part in ("validation", "test"):
        rel = split["files"][part]
        if not rel:
            continue
        fp32, int8 = Classifier(run, provider="cpu"), Classifier(out, provider="cpu")
        x = np.stack([fp32.load_image(str(root / r)) for r in rel])
        y = np.array([fp32.labels.index(Path(r).parts[0]) for r in rel])
        p32, p8 = fp32.predict(x), int8.predict(x)
        a = rec[part]
        assert a["n"] == len(rel)
        assert a["accuracy_fp32"] == pytest.approx((p32.argmax(1) == y).mean(), abs=1e-6)
        assert a["accuracy"] == pytest.approx((p8.argmax(1) == y).mean(), abs=1e-6)
        assert a["max_prob_diff"] == pytest.approx(np.abs(p8 - p32).max(), abs=1e-4)
        assert a["max_prob_diff"] > 0  # really a different model


def test_int8_run_folder_works_with_label_and_evaluate(int8_export):
    run, out, _ = int8_export
    img = next((EXAMPLES / "daisy").glob("*.jpg"))
    lab = json.loads(run_cli("label", out, img, "--json", "--provider", "cpu").stdout)
    assert lab[0]["label"] in read_metadata(run)["labels"]
    ev8 = json.loads(run_cli("evaluate", out, EXAMPLES, "--json", "-q").stdout)
    ev32 = json.loads(run_cli("evaluate", run, EXAMPLES, "--json", "-q").stdout)
    assert ev8["n"] == ev32["n"] == 60
    assert abs(ev8["accuracy"] - ev32["accuracy"]) <= 0.05  # 3 of 60 photos at most


def test_fp32_and_fp16_exports_are_verified(flowers_run, tmp_path):
    run = _copy_run(flowers_run, tmp_path / "run")
    p = run_cli("export", run, "-o", tmp_path / "fp32", "--json")
    rec = json.loads(p.stdout)
    assert rec["format"] == "onnx" and rec["verified_on"]["all"]["max_prob_diff"] < 1e-6
    assert rec["verified_on"]["all"]["change_points"] == 0
    p = run_cli("export", run, "--format", "onnx-fp16", "-o", tmp_path / "fp16", "--json")
    rec = json.loads(p.stdout)
    m = onnx.load(str(tmp_path / "fp16" / "model.onnx"))
    assert sum(i.data_type == onnx.TensorProto.FLOAT16 for i in m.graph.initializer) > 40
    assert m.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # io stays float32
    assert 0 < rec["verified_on"]["all"]["max_prob_diff"] < 0.05
    assert read_metadata(tmp_path / "fp16")["format"] == "onnx-fp16"
    assert set(json.loads((run / "exports.json").read_text())) == {"onnx", "onnx-fp16"}


def test_disagreement_beyond_tolerance_refuses_then_force_writes(flowers_run, tmp_path):
    run = _copy_run(flowers_run, tmp_path / "run")
    out = tmp_path / "fp16"
    p = run_cli("export", run, "--format", "onnx-fp16", "-o", out, "--max-prob-diff", "1e-9", check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    line = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
    assert len(line) == 1 and "moves a probability by 0.0" in line[0] and "over --max-prob-diff 1e-09" in line[0] and "--force" in line[0]
    assert not out.exists()
    p = run_cli("export", run, "--format", "onnx-fp16", "-o", out, "--max-prob-diff", "1e-9", "--force")
    assert "WARNING: outside the tolerance" in p.stdout
    assert json.loads((out / "report.json").read_text())["export"]["forced"] is True


def test_user_errors_are_one_line(tiny_run, tmp_path):
    def err(*args):
        p = run_cli("export", *args, check=False)
        assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
        return p.stderr.strip()

    assert "Did you mean 'onnx-int8'" in err(tiny_run, "--format", "onnx-int4", "-o", tmp_path / "x")
    assert "is the run itself" in err(tiny_run, "-o", tiny_run)
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(tiny_run / "model.onnx", bare)
    assert "has no report.json" in err(bare, "-o", tmp_path / "y")
    moved = _copy_run(tiny_run, tmp_path / "moved")
    rep = json.loads((moved / "report.json").read_text())
    photos = rep["image_dir"]
    rep["image_dir"] = str(tmp_path / "gone")
    (moved / "report.json").write_text(json.dumps(rep))
    assert "--image-dir" in err(moved, "-o", tmp_path / "z")
    run_cli("export", moved, "-o", tmp_path / "z", "--image-dir", photos, "-q")  # and the hint works
    assert (tmp_path / "z" / "model.onnx").is_file()
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    assert "is not a run folder" in err(tiny_run, "-o", busy)
    assert "--calibration-images" in err(tiny_run, "-f", "onnx-int8", "--calibration-images", "0", "-o", tmp_path / "w")
