"""retrain.Classifier: a model (run folder or .onnx) and its preprocessing, on the tiny session run.

The expected probabilities come from a plain onnxruntime session fed by hand (the README's way),
not from the Classifier's own code."""

from __future__ import annotations

import io

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from conftest import make_image, with_metadata
from retrain.classifier import Classifier
from retrain.errors import ConfigError, ImageError, ModelError


@pytest.fixture(scope="module")
def clf(tiny_run):
    return Classifier(tiny_run, provider="cpu")


@pytest.fixture()
def photos(tmp_path):
    return [make_image(tmp_path / f"p{k}.jpg", k, 7000 + k) for k in range(3)]  # circle, stripes, squares


def by_hand(model_path, photo):
    """The README's recipe: metadata, PIL crop and resize, (x - mean) / std, NCHW, plain session."""
    import json

    sess = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    meta = sess.get_modelmeta().custom_metadata_map
    size, mean, std = int(meta["input_size"]), float(meta["mean"]), float(meta["std"])
    crop = float(meta["crop_fraction"])
    im = Image.open(photo).convert("RGB")
    w, h = im.size
    s = min(w, h) * crop
    im = im.resize((size, size), Image.BICUBIC, box=((w - s) / 2, (h - s) / 2, (w + s) / 2, (h + s) / 2))
    x = ((np.asarray(im, np.float32) - mean) / std).transpose(2, 0, 1)[None]
    return json.loads(meta["labels"]), sess.run(None, {"input": x})[0][0]


def test_what_the_model_says_about_itself(clf, tiny_run):
    assert clf.labels == ["circle", "squares", "stripes"]
    assert clf.path == tiny_run / "model.onnx"
    d = clf.describe()
    # The default's head-only features (Lite0 and Lite1 side by side): 224 px (Lite0's training
    # side), crop size / (size + 32)
    assert d["input_size"] == [224, 224] and d["mean"] == 127.0 and d["std"] == 128.0
    assert d["crop_fraction"] == pytest.approx(224 / 256)
    assert d["input_name"] == "input" and d["output_name"] == "final_result"
    assert d["architecture"] == "efficientnet_lite0+efficientnet_lite1" and clf.tta_default is False


def test_classify_matches_a_plain_session_fed_by_hand(clf, tiny_run, photos):
    res = clf.classify([str(p) for p in photos], top_k=3)
    assert [r["label"] for r in res] == ["circle", "stripes", "squares"]
    for r, p in zip(res, photos):
        labels, probs = by_hand(tiny_run / "model.onnx", p)
        assert [x["label"] for x in r["predictions"]] == [labels[i] for i in np.argsort(-probs)]
        for x in r["predictions"]:
            assert x["score"] == pytest.approx(float(probs[labels.index(x["label"])]), abs=2e-3)


def test_a_run_folder_and_its_model_file_are_the_same_classifier(clf, tiny_run, photos):
    other = Classifier(tiny_run / "model.onnx", provider="cpu")
    x = np.stack([clf.load_image(str(p)) for p in photos])
    assert np.allclose(other.predict(x), clf.predict(x), atol=1e-6)


def test_bytes_and_paths_give_the_same_answer(clf, photos):
    from_bytes = clf.classify([p.read_bytes() for p in photos], top_k=2)
    from_paths = clf.classify([str(p) for p in photos], top_k=2)
    assert [r["path"] for r in from_bytes] == ["<bytes 0>", "<bytes 1>", "<bytes 2>"]
    assert [r["predictions"] for r in from_bytes] == [r["predictions"] for r in from_paths]


def test_predict_gives_probabilities_and_top_k_is_capped(clf, photos):
    x = np.stack([clf.load_image(str(p)) for p in photos])
    assert x.shape == (3, 224, 224, 3) and x.dtype == np.uint8
    p = clf.predict(x)
    assert p.shape == (3, 3) and np.allclose(p.sum(1), 1, atol=1e-4) and (p >= 0).all()
    top = clf.top_k(p[0], 10)
    assert len(top) == 3 and [t["score"] for t in top] == sorted((t["score"] for t in top), reverse=True)


def test_tta_averages_with_the_mirror_image(clf, photos):
    x = np.stack([clf.load_image(str(p)) for p in photos])
    mirrored = x[:, :, ::-1].copy()  # left-right, in (N, H, W, 3)
    expected = (clf.predict(x) + clf.predict(mirrored)) / 2
    assert np.allclose(clf.predict(x, tta=True), expected, atol=1e-5)
    # A photo that is not symmetric gets other scores with tta than without.
    asym = np.zeros((1, clf.height, clf.width, 3), np.uint8)
    asym[:, :, :60] = (220, 40, 40)
    assert not np.allclose(np.log(clf.predict(asym, tta=True)), np.log(clf.predict(asym)), atol=1e-3)


def test_failures_are_nan_rows_and_reasons(clf, photos, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    probs, errors = clf.classify_files([str(photos[0]), str(bad), str(photos[1])])
    assert list(errors) == [1] and np.isnan(probs[1]).all() and not np.isnan(probs[[0, 2]]).any()
    res = clf.classify([str(bad), str(photos[0])])
    assert set(res[0]) == {"path", "error"} and res[1]["label"] == "circle"
    with pytest.raises(ImageError):
        clf.load_image(b"not an image")
    buf = io.BytesIO()
    Image.new("RGB", (5, 300), (0, 200, 0)).save(buf, "PNG")  # any shape comes out the model's size
    assert clf.load_image(buf.getvalue()).shape == (224, 224, 3)


def test_a_model_without_metadata_needs_a_labels_file(tiny_run, tmp_path, photos):
    bare = with_metadata(tiny_run, tmp_path / "bare.onnx", labels=None)
    with pytest.raises(ModelError, match="no retrain metadata .*--labels"):
        Classifier(bare, provider="cpu")
    (tmp_path / "labels.txt").write_text("round\nboxes\nlines\n")
    renamed = Classifier(bare, provider="cpu", labels=tmp_path / "labels.txt")
    assert renamed.labels == ["round", "boxes", "lines"]
    assert renamed.classify([str(photos[0])])[0]["label"] == "round"  # the first output, renamed
    (tmp_path / "two.txt").write_text("a\nb\n")
    with pytest.raises(ModelError, match="2 labels .* but the model outputs 3 classes"):
        Classifier(bare, provider="cpu", labels=tmp_path / "two.txt")


def test_overrides_change_the_preprocessing(tiny_run, photos):
    with pytest.raises(ConfigError, match="takes 224x224 images"):  # the graph's input is fixed
        Classifier(tiny_run, provider="cpu", input_height=112, input_width=112)
    shifted = Classifier(tiny_run, provider="cpu", input_mean=0.0, input_std=255.0)
    plain = Classifier(tiny_run, provider="cpu")
    x = np.stack([plain.load_image(str(p)) for p in photos])
    # (the tiny run is sure of these photos either way: compare the log-probabilities)
    assert np.abs(np.log(shifted.predict(x)) - np.log(plain.predict(x))).max() > 1.0
