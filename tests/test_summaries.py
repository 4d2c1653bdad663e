"""`fit --summaries_dir`: events read back with TensorBoard's own reader (and its server)."""

from __future__ import annotations

import json
import math
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from conftest import make_dataset, run_cli


def _accumulator(folder: Path):
    from tensorboard.backend.event_processing import event_accumulator as ea

    acc = ea.EventAccumulator(str(folder), size_guidance={ea.SCALARS: 0, ea.HISTOGRAMS: 0, ea.TENSORS: 0})
    acc.Reload()
    return acc


@pytest.fixture(scope="module")
def sgd_run(tmp_path_factory):
    """A codelab-style SGD run with summaries, through the real CLI."""
    root = tmp_path_factory.mktemp("tb")
    data = make_dataset(root / "images", per_class=10)
    out, tb = root / "run", root / "summaries"
    run_cli("fit", data, "-o", out, "-q", "--summaries_dir", tb, "--learning_rate", "0.05",
            "--how_many_training_steps", "60", "--eval_step_interval", "10")
    return json.loads((out / "report.json").read_text()), tb, data


def test_scalars_match_the_training_history(sgd_run):
    report, tb, _ = sgd_run
    hist = report["history"]
    train, val = _accumulator(tb / "train"), _accumulator(tb / "validation")
    assert set(train.Tags()["scalars"]) == {"accuracy", "cross_entropy", "learning_rate"}
    assert set(val.Tags()["scalars"]) == {"accuracy", "cross_entropy"}
    steps = [h["step"] for h in hist]
    assert steps == [10, 20, 30, 40, 50, 60]
    for tag, key in (("accuracy", "train_accuracy"), ("cross_entropy", "cross_entropy")):
        ev = train.Scalars(tag)
        assert [e.step for e in ev] == steps
        assert [e.value for e in ev] == pytest.approx([h[key] for h in hist], rel=1e-6)
    ev = val.Scalars("accuracy")
    assert [e.value for e in ev] == pytest.approx([h["validation_accuracy"] for h in hist], rel=1e-6)
    assert [e.value for e in train.Scalars("learning_rate")] == pytest.approx([0.05] * 6)


def test_weight_histograms_and_pr_curves(sgd_run):
    from tensorboard.util import tensor_util

    report, tb, _ = sgd_run
    acc = _accumulator(tb / "train")
    assert set(acc.Tags()["histograms"]) == {"final_layer/weights", "final_layer/biases"}
    w = acc.Histograms("final_layer/weights")[-1]
    assert w.step == 60 and w.histogram_value.num == 2560 * 3  # (C, K) weights of the head (the default's 2,560 features)
    labels = report["labels"]
    assert set(acc.Tags()["tensors"]) == {f"pr_curve/{c}" for c in labels}
    te = report["metrics"]["test"]
    for c in labels:
        ev = acc.Tensors(f"pr_curve/{c}")[-1]
        data = tensor_util.make_ndarray(ev.tensor_proto)  # rows: TP, FP, TN, FN, precision, recall
        assert data.shape == (6, 127)
        tp, fp, tn, fn = data[:4, 0]
        assert tp + fn == te["per_class"][c]["support"]  # positives of this class in the test set
        assert tp + fp + tn + fn == te["n"]


def test_projector_has_every_bottleneck_with_labels_and_thumbnails(sgd_run):
    from google.protobuf import text_format
    from PIL import Image
    from tensorboard.plugins.projector import projector_config_pb2

    report, tb, data = sgd_run
    cfg = text_format.Parse((tb / "train" / "projector_config.pbtxt").read_text(),
                            projector_config_pb2.ProjectorConfig())
    (emb,) = cfg.embeddings
    folder = tb / "train"
    X = np.loadtxt(folder / emb.tensor_path, delimiter="\t")
    assert X.shape == (30, 2560)
    meta = (folder / emb.metadata_path).read_text().splitlines()
    assert meta[0] == "label\tsplit\tfile" and len(meta) == 31
    rows = [m.split("\t") for m in meta[1:]]
    assert {r[0] for r in rows} == set(report["labels"])
    assert sum(r[1] == "test" for r in rows) == report["split_counts"]["test"]
    assert all((data / r[2]).is_file() and r[2].startswith(r[0] + "/") for r in rows)
    sprite = Image.open(folder / emb.sprite.image_path)
    side = math.ceil(math.sqrt(30)) * emb.sprite.single_image_dim[0]
    assert sprite.size == (side, side)
    # the first thumbnail is the first image, not a grey placeholder
    cell = np.asarray(sprite)[:48, :48].astype(float)
    assert cell.std() > 10


@pytest.mark.slow
def test_running_again_replaces_the_events(tmp_path, sgd_run):
    _, _, data = sgd_run
    tb = tmp_path / "tb"
    (tb / "train").mkdir(parents=True)
    (tb / "train" / "notes.txt").write_text("mine")
    for _ in range(2):
        run_cli("fit", data, "-o", tmp_path / "run", "-q", "--summaries_dir", tb,
                "--how_many_training_steps", "20", "--learning_rate", "0.1")
    assert len(list((tb / "train").glob("events.out.tfevents.*"))) == 1
    assert (tb / "train" / "notes.txt").read_text() == "mine"
    assert [e.step for e in _accumulator(tb / "train").Scalars("accuracy")] == [10, 20]


def test_sweep_writes_one_tensorboard_run_per_setting(tmp_path, sgd_run):
    _, _, data = sgd_run
    tb = tmp_path / "tb"
    run_cli("fit", data, "-o", tmp_path / "sweep", "-q", "--summaries_dir", tb,
            "--learning_rate", "0.01,0.5", "--how_many_training_steps", "20")
    for tag in ("learning_rate=0.01", "learning_rate=0.5"):
        lr = _accumulator(tb / tag / "train").Scalars("learning_rate")
        assert lr[0].value == pytest.approx(float(tag.split("=")[1]))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_stock_tensorboard_serves_it(sgd_run):
    """`tensorboard --logdir DIR` (no TensorFlow installed) shows the scalars and the projector."""
    pytest.importorskip("tensorboard")
    report, tb, _ = sgd_run
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", str(tb), "--port", str(port),
                             "--host", "127.0.0.1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def get(path):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
            return r.read()

    try:
        deadline = time.time() + 60
        while True:
            try:
                runs = json.loads(get("/data/runs"))
                if set(runs) >= {"train", "validation"}:
                    break
            except OSError:
                pass
            if time.time() > deadline:
                pytest.fail("tensorboard did not list the train and validation runs within 60 s")
            time.sleep(0.5)
        scalars = json.loads(get("/data/plugin/scalars/scalars?run=validation&tag=accuracy"))
        assert [s[1] for s in scalars] == [h["step"] for h in report["history"]]
        assert json.loads(get("/data/plugin/projector/runs")) == ["train"]
        info = json.loads(get("/data/plugin/projector/info?run=train"))
        assert info["embeddings"][0]["tensorShape"] == [30, 2560]
        raw = get("/data/plugin/projector/tensor?run=train&name=bottlenecks")
        assert len(raw) == 30 * 2560 * 4  # float32 for the browser
        assert get("/data/plugin/projector/sprite_image?run=train&name=bottlenecks")[:2] == b"\xff\xd8"
        meta = get("/data/plugin/projector/metadata?run=train&name=bottlenecks").decode()
        assert meta.startswith("label\tsplit\tfile")
    finally:
        proc.terminate()
        proc.wait(10)
