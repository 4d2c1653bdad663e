"""Temperature scaling, ECE and the "unknown" threshold: the maths, then the real CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import make_image, run_cli, with_metadata
from retrain import calibrate
from retrain.errors import ConfigError


def _overconfident(n=2000, k=4, seed=0):
    """Logits whose softmax is too sure: true T is 3 (labels drawn from softmax(z / 3))."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 4, (n, k))
    p = calibrate.softmax(z / 3.0)
    y = np.array([rng.choice(k, p=pi) for pi in p])
    return z, y


def test_temperature_recovers_the_true_scale_and_lowers_ece():
    z, y = _overconfident()
    T = calibrate.fit_temperature(z, y)
    assert 2.5 < T < 3.5
    before = calibrate.expected_calibration_error(calibrate.softmax(z), y)
    after = calibrate.expected_calibration_error(calibrate.softmax(z / T), y)
    assert after < before / 2
    assert calibrate.nll(z, y, T) < calibrate.nll(z, y, 1.0)


def test_temperature_keeps_predictions_and_stays_1_when_calibrated():
    rng = np.random.default_rng(1)
    z = rng.normal(0, 2, (3000, 3))
    y = np.array([rng.choice(3, p=pi) for pi in calibrate.softmax(z)])
    T = calibrate.fit_temperature(z, y)
    assert 0.85 < T < 1.15
    assert (calibrate.softmax(z / T).argmax(1) == z.argmax(1)).all()


def test_ece_of_perfect_and_of_wrong_predictions():
    y = np.array([0, 1, 0, 1])
    sure_right = np.eye(2)[y]
    assert calibrate.expected_calibration_error(sure_right, y) == pytest.approx(0.0)
    assert calibrate.expected_calibration_error(np.eye(2)[1 - y], y) == pytest.approx(1.0)


def test_unknown_threshold_reaches_the_target_precision_with_most_coverage():
    # 10 predictions by falling confidence; the two least sure are wrong.
    conf = np.linspace(0.99, 0.5, 10)
    probs = np.stack([conf, 1 - conf], 1)
    y = np.array([0] * 8 + [1] * 2)
    u = calibrate.unknown_threshold(probs, y, 0.95)
    assert u["precision"] == 1.0 and u["coverage"] == 0.8
    assert u["threshold"] == pytest.approx(conf[7])
    sel = calibrate.selective_metrics(probs, y, u["threshold"])
    assert sel == {"coverage": 0.8, "precision": 1.0}
    # Unreachable: every prediction wrong.
    assert calibrate.unknown_threshold(probs, 1 - np.zeros(10, int), 0.95)["threshold"] is None
    with pytest.raises(ConfigError, match="between 0 and 1"):
        calibrate.unknown_threshold(probs, y, 95)


def test_fit_calibrates_and_label_answers_unknown(tmp_path):
    """Real CLI: temperature + threshold land in the model; an off-domain image is 'unknown'."""
    from conftest import make_dataset
    from retrain.model import read_metadata

    data = make_dataset(tmp_path / "images", per_class=12)
    out = tmp_path / "run"
    p = run_cli("fit", data, "-o", out, "--unknown-precision", "0.95", "--validation_percentage", "25",
                "--testing_percentage", "20")
    rep = json.loads((out / "report.json").read_text())
    cal = rep["calibration"]
    assert cal["temperature"] > 0 and "ece_validation_before" in cal and "ece_validation_after" in cal
    assert set(rep["metrics"]["test"]["per_class_recall"]) == {"circle", "stripes", "squares"}
    meta = read_metadata(out)
    assert meta["temperature"] == cal["temperature"]
    if cal.get("unknown_threshold") is None:
        pytest.skip("no threshold reached 0.95 on this tiny validation split")
    assert meta["unknown_threshold"] == pytest.approx(cal["unknown_threshold"])
    assert "Unknown threshold" in p.stderr
    # The photos it was trained on are answered with their class: the threshold was chosen so that
    # (nearly) all of their held-out predictions are accepted.
    answers = json.loads(run_cli("label", out, data, "--json", "--top-k", "1").stdout)
    assert len(answers) == 36
    assert sum(r["label"] == r["path"].split("/")[-2] for r in answers) >= 34, answers
    # A flat grey picture looks like none of the classes. The same model with the threshold moved
    # just above its top score answers "unknown"; moved below it, the top label.
    from PIL import Image

    grey = tmp_path / "grey.png"
    Image.new("RGB", (64, 64), (128, 128, 128)).save(grey)
    top = json.loads(run_cli("label", out, grey, "--json").stdout)[0]["predictions"][0]
    assert top["score"] < 0.99, top
    for threshold, expected in (((top["score"] + 1) / 2, "unknown"), (top["score"] / 2, top["label"])):
        moved = with_metadata(out, tmp_path / "moved.onnx", unknown_threshold=threshold,
                              novelty_threshold=None)  # the top-score threshold alone (grey is novel)
        res = json.loads(run_cli("label", moved, grey, "--json").stdout)[0]
        assert res["label"] == expected and res["predictions"][0] == top, (threshold, res)


def test_bad_unknown_precision_is_one_line(tiny_dataset, tmp_path):
    p = run_cli("fit", tiny_dataset, "-o", tmp_path / "r", "--unknown-precision", "95", check=False)
    assert p.returncode == 2
    assert "between 0 and 1" in p.stderr and "Traceback" not in p.stderr


def test_balanced_class_weights_and_per_class_recall(tmp_path):
    """An imbalanced set (12/12/4): --class-weights balanced is used and every report has per-class recall."""

    root = tmp_path / "images"
    for k, (c, n) in enumerate((("circle", 12), ("stripes", 12), ("squares", 4))):
        for i in range(n):
            make_image(root / c / f"{c}_{i}.jpg", k, 500 + k * 100 + i)
    out = tmp_path / "run"
    run_cli("fit", root, "-o", out, "--class-weights", "balanced")
    rep = json.loads((out / "report.json").read_text())
    assert rep["train"]["class_weights"] == "balanced"
    for split in ("train", "validation", "test"):
        rec = rep["metrics"][split]["per_class_recall"]
        assert set(rec) == {"circle", "stripes", "squares"}
        assert all(0.0 <= v <= 1.0 for v in rec.values())
    ev = json.loads(run_cli("evaluate", out, root, "--json").stdout)
    assert ev["per_class"]["squares"]["support"] == 4 and "recall" in ev["per_class"]["squares"]
