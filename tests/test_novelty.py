"""Open-set rejection (retrain.novelty): a model trained on two classes of real generated photos
answers "unknown" for photos of a third class it never saw, through the model's own `novelty`
output: in a plain onnxruntime session, `retrain label`, `retrain evaluate --unknown-dir`, the
server's /v1/classify, report.json and report.html. Then the maths: the conformal threshold,
the tightening by example photos, and the ONNX nodes against numpy."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import numpy as np
import pytest

from conftest import make_dataset, make_image, one_error_line, run_cli

SEEN = ("circle", "stripes")  # make_image kinds 0 and 1; the model never sees kind 2 (squares)


@pytest.fixture(scope="module")
def held_out(tmp_path_factory):
    """A run trained by the real CLI on circles and stripes (15 each), new photos of both, and
    12 photos of squares, a class it never saw."""
    root = tmp_path_factory.mktemp("novelty")
    data = make_dataset(root / "images", classes=SEEN, per_class=15)
    for i in range(12):
        make_image(root / "squares" / f"sq_{i}.jpg", 2, 5000 + i)
        make_image(root / "new" / SEEN[i % 2] / f"new_{i}.jpg", i % 2, 7000 + i)
    run = root / "run"
    run_cli("fit", data, "-o", run)
    return {"root": root, "data": data, "run": run, "squares": root / "squares", "new": root / "new"}


def preprocess(path, meta) -> np.ndarray:
    """The README's preprocessing for a plain onnxruntime client (no retrain code)."""
    from PIL import Image

    size, mean, std, crop = int(meta["input_size"]), float(meta["mean"]), float(meta["std"]), float(meta["crop_fraction"])
    im = Image.open(path).convert("RGB")
    w, h = im.size
    s = min(w, h) * crop
    im = im.resize((size, size), Image.BICUBIC, box=((w - s) / 2, (h - s) / 2, (w + s) / 2, (h + s) / 2))
    return ((np.asarray(im, np.float32) - mean) / std).transpose(2, 0, 1)[None]


def test_a_plain_onnxruntime_client_sees_the_novelty_reject_a_class_never_seen(held_out):
    import onnxruntime as ort

    sess = ort.InferenceSession(str(held_out["run"] / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [o.name for o in sess.get_outputs()] == ["final_result", "novelty"]  # the probabilities stay first
    meta = sess.get_modelmeta().custom_metadata_map
    assert meta["novelty_output"] == "novelty" and "nearest training photo" in meta["novelty_method"]
    assert json.loads(meta["unknown_coverage"]) == 0.95
    threshold = json.loads(meta["novelty_threshold"])
    assert 0 < threshold < 1

    def novelty(folder):
        return np.array([sess.run(["novelty"], {"input": preprocess(p, meta)})[0][0]
                         for p in sorted(Path(folder).rglob("*.jpg"))])

    squares, new = novelty(held_out["squares"]), novelty(held_out["new"])
    assert (squares > threshold).sum() >= 11, (squares, threshold)  # a class it never saw: unknown
    assert (new <= threshold).sum() >= 9, (new, threshold)  # new photos of its classes: kept (95% asked)
    assert squares.min() > 2 * np.median(new)  # far apart, whatever the machine's rounding


def test_label_answers_unknown_with_the_best_class_and_scores_still_given(held_out):
    out = json.loads(run_cli("label", held_out["run"], held_out["squares"], "--json").stdout)
    assert len(out) == 12
    assert sum(r["label"] == "unknown" and r["unknown"] for r in out) >= 11
    for r in out:
        assert set(r) == {"path", "label", "predictions", "novelty", "unknown"}
        assert [p["label"] for p in r["predictions"]] and {p["label"] for p in r["predictions"]} == set(SEEN)
        assert isinstance(r["novelty"], float)
    text = run_cli("label", held_out["run"], held_out["squares"] / "sq_0.jpg").stdout
    assert "-> unknown (novelty " in text and "unlike the photos it was trained on" in text
    kept = json.loads(run_cli("label", held_out["run"], held_out["new"], "--json").stdout)
    assert sum(r["label"] == r["path"].split("/")[-2] and not r["unknown"] for r in kept) >= 9


def test_the_report_measures_the_open_set_protocol(held_out):
    rep = json.loads((held_out["run"] / "report.json").read_text())
    nov = rep["novelty"]
    assert nov["method"] == "knn-cosine-sqrt" and nov["coverage"] == 0.95
    assert nov["references"]["from"] == "train + validation" and nov["threshold"] > 0
    held = nov["held_out_classes"]
    assert [r["class"] for r in held["classes"]] == list(SEEN)
    assert all(r["auroc"] is not None and r["auroc"] > 0.9 for r in held["classes"]), held
    assert sum(nov["histogram"]["inside"]) == rep["split_counts"]["test"]
    page = (held_out["run"] / "report.html").read_text()
    assert 'id="novelty"' in page and 'id="chart-novelty"' in page and 'id="novelty-held-out"' in page


def test_evaluate_unknown_dir_reports_the_open_set_figures(held_out, tmp_path):
    page = tmp_path / "eval.html"
    p = run_cli("evaluate", held_out["run"], held_out["new"], "--unknown-dir", held_out["squares"], "--json",
                "--html", page)
    m = json.loads(p.stdout)
    right = sum(1 for r in m["misclassified"])  # closed-set: the best class, whatever the novelty
    assert m["n"] == 12 and m["accuracy"] == pytest.approx((12 - right) / 12)
    o = m["open_set"]
    assert o["score"] == "novelty" and o["outside"]["n"] == 12
    assert o["outside"]["rejected"] >= 11 / 12 and o["auroc"] > 0.95
    assert o["inside"]["rejected"] <= 3 / 12
    assert 'id="chart-novelty"' in page.read_text()
    human = run_cli("evaluate", held_out["run"], held_out["new"], "--unknown-dir", held_out["squares"]).stdout
    assert f"outside photos ({held_out['squares']}, n=12): " in human and "AUROC" in human
    # a folder that is not there: one line
    p = run_cli("evaluate", held_out["run"], held_out["new"], "--unknown-dir", tmp_path / "nope", check=False)
    assert p.returncode == 2 and "--unknown-dir" in one_error_line(p.stderr)


def test_serve_returns_the_novelty_and_whether_it_is_unknown(held_out):
    from test_serve import Server

    s = Server(held_out["run"])
    try:
        info = httpx.get(f"{s.url}/v1/model").json()
        assert info["novelty_output"] == "novelty" and info["novelty_threshold"] > 0
        sq = httpx.post(f"{s.url}/v1/classify", content=(held_out["squares"] / "sq_3.jpg").read_bytes(),
                        headers={"Content-Type": "image/jpeg"}).json()
        assert sq["unknown"] is True and sq["label"] == "unknown" and sq["novelty"] > info["novelty_threshold"]
        assert sq["predictions"][0]["label"] in SEEN and "time_ms" in sq and "model_id" in sq
        seen = sorted((held_out["data"] / "circle").glob("*.jpg"))[0]  # a photo it learnt from
        r = httpx.post(f"{s.url}/v1/classify", files={"file": ("c.jpg", seen.read_bytes(), "image/jpeg")}).json()
        assert r["unknown"] is False and r["label"] == "circle" and r["novelty"] <= info["novelty_threshold"]
        spec = httpx.get(f"{s.url}/openapi.json").json()
        assert {"novelty", "unknown"} <= set(spec["components"]["schemas"]["Classification"]["properties"])
    finally:
        assert "Traceback" not in s.stop()


def test_unknown_examples_tighten_and_no_unknown_turns_it_off(held_out, tmp_path):
    from retrain.classifier import Classifier
    from retrain.model import read_metadata

    # Photos of no class: a few squares (the other squares stay unseen) and flat grey pictures.
    ex = tmp_path / "not-a-class"
    for i in range(6):
        make_image(ex / f"sq_{i}.png", 2, 9000 + i)
    run = tmp_path / "tight"
    p = run_cli("fit", held_out["data"], "-o", run, "--unknown-examples", ex)
    nov = json.loads((run / "report.json").read_text())["novelty"]
    e = nov["examples"]
    assert e["n"] == 6 and e["examples_rejected"] == 1.0 and e["threshold"] <= nov["threshold_at_coverage"]
    assert nov["threshold"] == e["threshold"] == pytest.approx(read_metadata(run)["novelty_threshold"], abs=1e-6)
    assert "Unknown examples: 6 photos" in p.stderr
    assert json.loads((run / "report.json").read_text())["labels"] == list(SEEN)  # never a class

    off = tmp_path / "off"
    run_cli("fit", held_out["data"], "-o", off, "--no-unknown")
    meta = read_metadata(off)
    assert "novelty_output" not in meta and "novelty_threshold" not in meta
    clf = Classifier(off)
    assert [o.name for o in clf.session.get_outputs()] == ["final_result"]
    r = clf.classify([str(held_out["squares"] / "sq_0.jpg")])[0]
    assert r["novelty"] is None and r["unknown"] is False and r["label"] in SEEN  # an old-style model


@pytest.mark.parametrize("args, words", [
    (("--unknown-examples", "{data}/circle"), "inside the image folder"),
    (("--unknown-examples", "{root}/nope"), "folder not found"),
    (("--unknown-examples", "{root}/squares", "--no-unknown"), "drop one of them"),
    (("--unknown-coverage", "1.5"), "--unknown_coverage must be a number from 0.5 to 1"),
])
def test_bad_unknown_options_are_one_line(held_out, tmp_path, args, words):
    args = [a.format(data=held_out["data"], root=held_out["root"]) for a in args]
    p = run_cli("fit", held_out["data"], "-o", tmp_path / "r", *args, check=False)
    assert p.returncode == 2 and words in one_error_line(p.stderr), p.stderr
    assert not (tmp_path / "r").exists()


# ------------------------------------------------------------------------------ the maths

def test_conformal_threshold_keeps_the_coverage_or_says_it_cannot():
    from retrain.novelty import conformal_threshold

    s = np.arange(1, 101) / 100.0  # 100 in-distribution scores 0.01 .. 1.00
    assert conformal_threshold(s, 0.95) == pytest.approx(0.96)  # the ceil(101 * 0.95) = 96th
    assert conformal_threshold(s[:18], 0.95) is None  # 19 needed at 95%
    assert conformal_threshold(s[:19], 0.95) == pytest.approx(0.19)
    assert conformal_threshold(s, 0.5) == pytest.approx(0.51)


def test_tightening_only_moves_the_threshold_down():
    from retrain.novelty import tighten

    inside = np.linspace(0, 1, 101)  # 0.00, 0.01, ..., 1.00
    t, info = tighten(0.9, inside, np.array([0.95, 0.97]), min_kept=0.85)  # already rejected: unchanged
    assert t == 0.9 and info["examples_rejected"] == 1.0
    t, info = tighten(0.9, inside, np.array([0.86, 0.87, 0.88]), min_kept=0.85)  # worth a few inside photos
    assert t == pytest.approx(0.85) and info["examples_rejected"] == 1.0
    assert info["inside_kept"] == pytest.approx(86 / 101) and info["inside_kept_before"] == pytest.approx(91 / 101)
    t, _ = tighten(0.9, inside, np.array([0.01, 0.5]), min_kept=0.85)  # deep inside: never at any price
    assert t == 0.9
    t, _ = tighten(None, inside, np.array([0.995]))  # no threshold yet (too few photos): the examples choose
    assert t == pytest.approx(0.99)


@pytest.mark.parametrize("opset", [13, 17, 18])
def test_the_onnx_nodes_compute_what_numpy_computes(opset):
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from retrain.novelty import Novelty, onnx_nodes, transform

    rng = np.random.default_rng(0)
    refs = rng.normal(size=(40, 16)).astype(np.float32)
    nov = Novelty(transform(refs).astype(np.float16), np.zeros(40, np.int64), 0.3, 0.95)
    nodes, inits, out = onnx_nodes(nov, "features", opset)
    g = helper.make_graph(nodes, "n", [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", 16])],
                          [out], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.concatenate([refs[:3] * 2.5, rng.normal(size=(5, 16)), np.zeros((1, 16))]).astype(np.float32)
    got = sess.run(None, {"features": x})[0]
    assert got.shape == (9,)
    assert np.allclose(got, nov.score(x), atol=1e-4)
    assert np.allclose(got[:3], 0, atol=1e-3)  # a reference (scaled) is its own nearest neighbour
    assert got[-1] == pytest.approx(1.0)  # all-zero features: as unlike anything as can be
