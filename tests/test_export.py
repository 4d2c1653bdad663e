"""The written model is self-describing: plain onnxruntime + its metadata is all anyone needs."""

import json

import numpy as np
import onnxruntime as ort
from PIL import Image

from conftest import EXAMPLES, UNSEEN
from retrain.model import Classifier


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
    assert [o.name for o in sess.get_outputs()] == ["final_result"]
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
    assert r["config"]["architecture"] == "efficientnet_lite0"
    assert sum(r["split_counts"].values()) == 60
    assert set(r["metrics"]) == {"train", "validation", "test"}
    assert r["timings"]["total_s"] > 0 and r["export_parity_max_abs_diff"] < 2e-3
    split = json.loads((flowers_run / "split.json").read_text())
    assert all((EXAMPLES / f).is_file() for f in split["files"]["test"])
