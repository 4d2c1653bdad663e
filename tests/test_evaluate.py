"""retrain.evaluate: compute_metrics on predictions whose every figure is worked out by hand below,
then `evaluate` on real photos (one of them filed under the wrong class) and the real CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from conftest import make_dataset, make_image, run_cli
from retrain.evaluate import compute_metrics, evaluate, format_metrics

LABELS = ["cat", "dog", "fox"]
# (true class, probabilities): ten predictions, six right.
ROWS = [
    ("cat", [0.90, 0.05, 0.05]),   # 0 right
    ("cat", [0.80, 0.10, 0.10]),   # 1 right
    ("cat", [0.30, 0.60, 0.10]),   # 2 cat -> dog (0.6)
    ("cat", [0.20, 0.30, 0.50]),   # 3 cat -> fox (0.5)
    ("dog", [0.20, 0.70, 0.10]),   # 4 right
    ("dog", [0.05, 0.90, 0.05]),   # 5 right
    ("dog", [0.55, 0.40, 0.05]),   # 6 dog -> cat (0.55)
    ("fox", [0.025, 0.025, 0.95]),  # 7 right
    ("fox", [0.35, 0.40, 0.25]),   # 8 fox -> dog (0.4)
    ("fox", [0.10, 0.30, 0.60]),   # 9 right
]


@pytest.fixture()
def metrics():
    y = [LABELS.index(t) for t, _ in ROWS]
    probs = np.array([p for _, p in ROWS])
    return compute_metrics(y, probs, LABELS, paths=[f"img{i}.jpg" for i in range(10)])


def test_confusion_and_accuracy_by_hand(metrics):
    # rows: true cat, dog, fox; columns: predicted cat, dog, fox
    assert metrics["confusion"] == [[2, 1, 1],
                                    [1, 2, 0],
                                    [0, 1, 2]]
    assert metrics["n"] == 10 and metrics["accuracy"] == pytest.approx(0.6)
    assert metrics["top5_accuracy"] == pytest.approx(1.0)  # 3 classes: the true one is always in the top 5
    assert metrics["labels"] == LABELS


def test_per_class_precision_recall_f1_by_hand(metrics):
    pc = metrics["per_class"]
    # cat: 2 right of 4 cats; 3 photos called cat (0, 1, 6), 2 of them cats.
    assert pc["cat"]["support"] == 4
    assert pc["cat"]["precision"] == pytest.approx(2 / 3, abs=1e-4)
    assert pc["cat"]["recall"] == pytest.approx(0.5, abs=1e-4)
    assert pc["cat"]["f1"] == pytest.approx(4 / 7, abs=1e-4)  # 2PR / (P + R) = (2/3) / (7/6)
    # dog: 2 right of 3 dogs; 4 photos called dog (2, 4, 5, 8).
    assert pc["dog"]["support"] == 3
    assert pc["dog"]["precision"] == pytest.approx(0.5, abs=1e-4)
    assert pc["dog"]["recall"] == pytest.approx(2 / 3, abs=1e-4)
    assert pc["dog"]["f1"] == pytest.approx(4 / 7, abs=1e-4)
    # fox: 2 right of 3 foxes; 3 photos called fox (3, 7, 9).
    assert pc["fox"]["support"] == 3
    assert pc["fox"]["precision"] == pytest.approx(2 / 3, abs=1e-4)
    assert pc["fox"]["recall"] == pytest.approx(2 / 3, abs=1e-4)
    assert pc["fox"]["f1"] == pytest.approx(2 / 3, abs=1e-4)
    assert metrics["macro_f1"] == pytest.approx((4 / 7 + 4 / 7 + 2 / 3) / 3, abs=1e-4)  # 0.6032


def test_cross_entropy_by_hand(metrics):
    # The probabilities of the true classes, multiplied: log of the product, over 10.
    product = 0.9 * 0.8 * 0.3 * 0.2 * 0.7 * 0.9 * 0.4 * 0.95 * 0.25 * 0.6  # = 0.001551312
    assert metrics["cross_entropy"] == pytest.approx(-math.log(product) / 10, abs=1e-5)  # 0.64687
    assert metrics["cross_entropy"] == pytest.approx(0.64687, abs=1e-4)


def test_misclassified_list_most_confident_first(metrics):
    assert metrics["misclassified"] == [
        {"path": "img2.jpg", "true": "cat", "predicted": "dog", "confidence": 0.6},
        {"path": "img6.jpg", "true": "dog", "predicted": "cat", "confidence": 0.55},
        {"path": "img3.jpg", "true": "cat", "predicted": "fox", "confidence": 0.5},
        {"path": "img8.jpg", "true": "fox", "predicted": "dog", "confidence": 0.4},
    ]
    json.dumps(metrics)  # JSON-ready as it is


def test_top5_and_a_class_nobody_has():
    labels = list("abcdef")
    probs = np.array([[0.01, 0.3, 0.25, 0.2, 0.14, 0.1],   # true a: ranked 6th, not in the top 5
                      [0.4, 0.3, 0.1, 0.1, 0.05, 0.05]])   # true b: 2nd
    m = compute_metrics([0, 1], probs, labels)
    assert m["accuracy"] == 0.0 and m["top5_accuracy"] == pytest.approx(0.5)
    assert m["per_class"]["f"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert m["macro_f1"] == 0.0  # over a and b (both f1 0); the four absent classes do not count
    assert [x["path"] for x in m["misclassified"]] == [1, 0]  # no paths: the indices, surest first
    empty = compute_metrics([], np.zeros((0, 6)), labels)
    assert empty["n"] == 0 and empty["accuracy"] is None and empty["misclassified"] == []


def test_macro_f1_leaves_out_absent_classes():
    # Two classes present, each right once and wrong never; a third class nobody has.
    m = compute_metrics([0, 1], np.array([[0.9, 0.05, 0.05], [0.1, 0.8, 0.1]]), ["x", "y", "z"])
    assert m["macro_f1"] == pytest.approx(1.0)  # not 2/3


def test_format_metrics_is_a_readable_table(metrics):
    text = format_metrics(metrics, "model on photos")
    lines = text.splitlines()
    assert lines[0] == "model on photos"
    assert lines[1].startswith("accuracy 60.00%  (n=10, cross entropy 0.6469, top-5 100.0%)")
    cat = next(line for line in lines if line.startswith("cat "))
    assert cat.split() == ["cat", "0.667", "0.500", "0.571", "4"]
    assert lines[-3:] == [
        "cat           2     1     1",
        "dog           1     2     0",
        "fox           0     1     2",
    ]


@pytest.fixture()
def held(tmp_path):
    """3 x 3 new photos of the tiny run's classes, plus a circle filed under stripes and a broken file."""
    root = make_dataset(tmp_path / "held", per_class=3, seed=11)
    make_image(root / "stripes" / "actually_a_circle.jpg", 0, 4242)
    (root / "squares" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg at all")
    return root


def test_evaluate_finds_the_photo_in_the_wrong_folder(tiny_run, held):
    m = evaluate(tiny_run, held, quiet=True)
    assert m["n"] == 10
    assert [s["path"].rsplit("/", 1)[-1] for s in m["skipped"]] == ["broken.jpg"]
    wrong = {x["path"].rsplit("/", 1)[-1]: x for x in m["misclassified"]}
    assert wrong["actually_a_circle.jpg"]["true"] == "stripes"
    assert wrong["actually_a_circle.jpg"]["predicted"] == "circle"
    # The figures agree with each other: the confusion's rows are the folders' counts, its
    # diagonal the right answers.
    conf = np.array(m["confusion"])
    assert dict(zip(m["labels"], conf.sum(1).tolist())) == {"circle": 3, "squares": 3, "stripes": 4}
    assert conf.trace() == 10 - len(m["misclassified"])
    assert m["accuracy"] == pytest.approx(conf.trace() / 10)
    assert m["per_class"]["stripes"]["support"] == 4
    assert m["model"].endswith("model.onnx") and m["tta"] is False


def test_evaluate_agrees_with_label_and_the_cli(tiny_run, held, tmp_path):
    """`retrain evaluate --json` counts as right exactly the photos whose best class in `retrain
    label` is their folder (closed-set), and as unknown those label answers unknown; the human
    table and --html say the same."""
    (held / "squares" / "broken.jpg").unlink()
    labelled = json.loads(run_cli("label", tiny_run, held, "--json", "--top-k", "1").stdout)
    right = sum(r["predictions"][0]["label"] == r["path"].split("/")[-2] for r in labelled)  # closed-set
    page = tmp_path / "eval.html"
    r = run_cli("evaluate", tiny_run, held, "--json", "--html", page)
    m = json.loads(r.stdout)
    assert m["n"] == 10 and m["accuracy"] == pytest.approx(right / 10)
    assert m["open_set"]["inside"]["rejected"] == pytest.approx(sum(r["unknown"] for r in labelled) / 10)
    assert page.is_file() and "stripes" in page.read_text()
    human = run_cli("evaluate", tiny_run, held).stdout
    assert f"accuracy {right * 10:.2f}%  (n=10," in human
    assert "actually_a_circle.jpg: stripes -> circle" in human


def test_evaluate_of_a_folder_with_nothing_readable_is_one_line(tiny_run, tmp_path):
    from conftest import one_error_line

    root = tmp_path / "held"
    for c in ("circle", "stripes"):
        (root / c).mkdir(parents=True)
        (root / c / "x.txt").write_text("notes")
    p = run_cli("evaluate", tiny_run, root, check=False)
    assert p.returncode == 2, (p.stdout, p.stderr)
    one_error_line(p.stderr)
