"""retrain.model: the written model is self-describing (plain onnxruntime + its metadata is all
anyone needs), and its metadata is checked when it is loaded: a value that makes no sense is one
clear error."""

import json

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from conftest import EXAMPLES, UNSEEN, make_image, one_error_line, run_cli
from retrain.classifier import Classifier
from retrain.errors import ModelError
from retrain.model import validate_metadata


def rewrite(src, dst, key, raw, *, dynamic_hw=False):
    """A copy of the model src with metadata `key` set to the string `raw` (as stored in the file)."""
    import onnx

    m = onnx.load(str(src))
    props = {p.key: p.value for p in m.metadata_props}
    props[key] = raw
    del m.metadata_props[:]
    for k, v in props.items():
        m.metadata_props.add(key=k, value=v)
    if dynamic_hw:  # an input of any height and width
        dims = m.graph.input[0].type.tensor_type.shape.dim
        dims[2].dim_param, dims[3].dim_param = "H", "W"
    onnx.save(m, str(dst))
    return dst


# (key, value as stored, what the error says it expected)
BAD = [
    ("labels", "5", "a list of class names"),
    ("labels", "dog", "a list of class names"),  # a string: its letters were taken as 3 labels
    ("labels", '["circle", "", "stripes"]', "a list of class names"),
    ("labels", '["circle", "squares"]', "has 2 class names but the model outputs 3 classes"),
    ("input_size", "abc", "a whole number of pixels (16 to 4096)"),
    ("input_size", "300", "224x224, the size of the model's input"),
    ("input_size", "true", "a whole number of pixels"),
    ("crop_fraction", "0", "above 0 and at most 1"),
    ("crop_fraction", "1.5", "above 0 and at most 1"),
    ("mean", "x", "a number from -10000 to 10000"),
    ("mean", "[1, 2]", "or a list of 3"),
    ("std", "0", "a number from 1e-06 to 10000"),
    ("std", "NaN", "a number from 1e-06"),
    ("unknown_threshold", "high", "a score from 0 to 1"),
    ("unknown_threshold", "1.5", "a score from 0 to 1"),
    ("temperature", "-1", "a positive number"),
    ("tta", "yes", "true or false"),
    ("output_name", "7", "the name of one of the model's tensors"),
]


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    return make_image(tmp_path_factory.mktemp("photo") / "circle.jpg", 0, 7)


@pytest.mark.parametrize("key,raw,expected", BAD, ids=[f"{k}={v}" for k, v, _ in BAD])
def test_bad_metadata_is_one_error_naming_the_key(tiny_run, tmp_path, photo, key, raw, expected):
    bad = rewrite(tiny_run / "model.onnx", tmp_path / "bad.onnx", key, raw)
    r = run_cli("label", bad, photo, check=False, timeout=60)
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error: ")]
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(errors) == 1, r.stderr
    assert f"metadata '{key}'" in errors[0] and expected in errors[0] and "retrain fit" in errors[0], errors[0]
    assert str(bad) in errors[0] and not r.stdout  # no labels printed from a model that cannot be trusted
    with pytest.raises(ModelError, match=f"metadata '{key}'"):
        Classifier(bad)


def test_input_size_of_a_model_of_any_size_is_bounded(tiny_run, tmp_path):
    ok = rewrite(tiny_run / "model.onnx", tmp_path / "any.onnx", "input_size", "256", dynamic_hw=True)
    assert (Classifier(ok).height, Classifier(ok).width) == (256, 256)  # the metadata says which size
    huge = rewrite(tiny_run / "model.onnx", tmp_path / "huge.onnx", "input_size", "100000", dynamic_hw=True)
    with pytest.raises(ModelError, match=r"metadata 'input_size' is 100000; expected a whole number of "
                                         r"pixels \(16 to 4096\)"):
        Classifier(huge)  # not an image of 100000 x 100000 pixels (30 GB)


def test_a_long_bad_value_is_cut_short(tiny_run, tmp_path):
    bad = rewrite(tiny_run / "model.onnx", tmp_path / "bad.onnx", "mean", "z" * 5000)
    with pytest.raises(ModelError) as e:
        Classifier(bad)
    assert len(str(e.value)) < 400 and "zzz..." in str(e.value)


def test_a_good_model_loads_and_labels(tiny_run, photo):
    clf = Classifier(tiny_run)
    assert clf.labels == ["circle", "squares", "stripes"] and (clf.height, clf.width) == (224, 224)
    assert clf.unknown_threshold is None or 0 <= clf.unknown_threshold <= 1
    r = run_cli("label", tiny_run, photo, timeout=60)
    assert r.stdout.splitlines()[0].split(" ")[0] in clf.labels


def test_an_override_replaces_a_bad_value(tiny_run, tmp_path, photo):
    bad = rewrite(tiny_run / "model.onnx", tmp_path / "bad.onnx", "labels", "5")
    (tmp_path / "labels.txt").write_text("circle\nsquares\nstripes\n")
    r = run_cli("label", bad, photo, "--labels", tmp_path / "labels.txt", timeout=60)  # the file is used instead
    assert r.stdout.split(" ")[0] in ("circle", "squares", "stripes")
    assert Classifier(bad, labels=tmp_path / "labels.txt").labels == ["circle", "squares", "stripes"]


def test_validate_metadata_accepts_what_retrain_writes():
    meta = {"labels": ["a", "b"], "input_size": 224, "mean": 127.0, "std": [58.4, 57.1, 57.4],
            "crop_fraction": 0.875, "unknown_threshold": None, "temperature": 1.3, "tta": False}
    validate_metadata(meta, ["N", 3, 224, 224], 2)
    validate_metadata({}, None, None)  # no metadata: the defaults (and --labels) apply
    with pytest.raises(ModelError, match="'std' is 0"):
        validate_metadata({**meta, "std": 0}, None, None)


def test_size_flags_replace_a_bad_input_size(tiny_run, tmp_path, photo):
    bad = rewrite(tiny_run / "model.onnx", tmp_path / "bad.onnx", "input_size", "abc")
    clf = Classifier(bad, input_height=224, input_width=224)
    assert (clf.height, clf.width) == (224, 224)
    r = run_cli("label", bad, photo, "--input_height", "224", "--input_width", "224", timeout=60)
    assert r.stdout.split(" ")[0] in clf.labels
    # A size the graph cannot take is one line, not an error from deep inside ONNX Runtime.
    r = run_cli("label", tiny_run, photo, "--input_height", "288", check=False, timeout=60)
    assert r.returncode == 2 and "takes 224x224 images" in one_error_line(r.stderr)


# ------------------------------------------------------------------ the written model

def _plain_preprocess(path, meta):
    """What a user outside retrain would write from the metadata alone."""
    size, crop = int(meta["input_size"]), float(meta["crop_fraction"])
    mean, std = float(meta["mean"]), float(meta["std"])
    im = Image.open(path).convert("RGB")
    w, h = im.size
    side = min(w, h) * crop
    im = im.resize((size, size), Image.BICUBIC, box=((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2))
    x = (np.asarray(im, np.float32) - mean) / std
    return x.transpose(2, 0, 1)[None]


def test_plain_onnxruntime_with_metadata_classifies_unseen_photos(flowers_run):
    sess = ort.InferenceSession(str(flowers_run / "model.onnx"), providers=["CPUExecutionProvider"])
    meta = sess.get_modelmeta().custom_metadata_map
    labels = json.loads(meta["labels"])
    assert labels == ["daisy", "dandelion", "roses", "sunflowers", "tulips"]
    assert [i.name for i in sess.get_inputs()] == ["input"]
    assert [o.name for o in sess.get_outputs()] == ["final_result", "novelty"]  # probabilities first
    assert sess.get_inputs()[0].shape[1:] == [3, 224, 224]
    for key in ("architecture", "mean", "std", "input_size", "metrics", "retrain_version"):
        assert key in meta
    correct = 0
    photos = sorted(UNSEEN.glob("*/*.jpg"))
    clf = Classifier(flowers_run, provider="cpu")
    for p in photos:
        probs = sess.run(["final_result"], {"input": _plain_preprocess(p, meta)})[0][0]
        assert abs(probs.sum() - 1) < 1e-4
        correct += labels[int(probs.argmax())] == p.parent.name
        # The same answer as retrain's own path (which uses JPEG draft decoding).
        ours = clf.predict(clf.load_image(str(p))[None])[0]
        assert int(ours.argmax()) == int(probs.argmax()) or abs(ours.max() - probs.max()) < 0.2
    assert correct >= 7, f"{correct}/10 unseen photos right"  # 60 training photos: most, not all


def test_labels_txt_matches_metadata(flowers_run):
    meta = json.loads(ort.InferenceSession(str(flowers_run / "model.onnx")).get_modelmeta()
                      .custom_metadata_map["labels"])
    assert (flowers_run / "labels.txt").read_text().split() == meta


def test_report_records_config_split_metrics_timings(flowers_run):
    r = json.loads((flowers_run / "report.json").read_text())
    assert r["config"]["architecture"] == r["architecture"] == "efficientnet_lite0+efficientnet_lite1"
    assert sum(r["split_counts"].values()) == 60
    assert {"train", "validation", "test"} <= set(r["metrics"])  # (+ cross_validation for small data)
    assert r["timings"]["total_s"] > 0 and r["export_parity_max_abs_diff"] < 2e-3
    split = json.loads((flowers_run / "split.json").read_text())
    assert all((EXAMPLES / f).is_file() for f in split["files"]["test"])
