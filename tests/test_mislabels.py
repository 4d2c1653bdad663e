"""Mislabelled photos (retrain.mislabels): confident learning on out-of-fold predictions, on
real (generated) photos with planted label errors, and moving the suspects for review and back."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import make_dataset
from test_report import browser, images_loaded, open_offline  # noqa: F401 (a fixture and helpers)

pytest.importorskip("cleanlab", reason="pip install 'retrain[labels]'")

# Two photos filed in the wrong class folder: (from, to), relative to the image folder.
PLANTED = {"circle/circle_0.jpg": "stripes/planted_circle.jpg",
           "stripes/stripes_1.jpg": "squares/planted_stripes.jpg"}


def planted_folder(root: Path) -> Path:
    """3 easily told apart classes x 16 photos, two of them moved into a wrong class. (With 10 a
    class, one fold's head can learn a planted photo's quirk, e.g. where its disc sits, and
    turn on a correct photo that shares it: confident learning needs a few photos per class.)"""
    make_dataset(root, per_class=16)
    for src, dst in PLANTED.items():
        (root / src).rename(root / dst)
    return root


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> Path:
    return planted_folder(tmp_path_factory.mktemp("planted") / "images")


@pytest.fixture()
def planted_copy(planted, tmp_path) -> Path:
    """A fresh copy for tests that move files (same bytes: the cached bottlenecks are reused)."""
    return Path(shutil.copytree(planted, tmp_path / "images"))


def label_check(folder):
    from retrain.check import label_issues
    from retrain.scan import scan

    return label_issues(scan(folder, quiet=True), quiet=True)


# ------------------------------------------------------------------------------ the method

def test_confident_learning_on_a_hand_worked_example():
    """3 classes (a, b, c) x 6 photos; out-of-fold probabilities given. The class thresholds
    are the mean probability of each class over the photos labelled with it:
    t_a = (0.05 + 0.4 + 4 * 0.9) / 6 = 0.675, t_b = 0.9, t_c = (5 * 0.9 + 0.2) / 6 = 0.783.
    - photo 0, in a, p = (0.05, 0.92, 0.03): p_b >= t_b, so it counts in C[a][b] and, the only
      photo of that pair, is flagged; score 1 - p_a = 0.95, suggested b.
    - photo 13, in c, p = (0.7, 0.1, 0.2): p_a >= t_a: C[c][a], flagged; score 0.8.
    - photo 1, in a, p = (0.4, 0.3, 0.3): above no threshold (unsure, not confidently another
      class) and its likeliest class is its own: not flagged."""
    from retrain.mislabels import find_label_issues

    good = {0: (0.9, 0.05, 0.05), 1: (0.05, 0.9, 0.05), 2: (0.05, 0.05, 0.9)}
    y = np.repeat([0, 1, 2], 6)
    P = np.array([good[c] for c in y])
    P[0] = (0.05, 0.92, 0.03)
    P[1] = (0.4, 0.3, 0.3)
    P[13] = (0.7, 0.1, 0.2)
    paths = [f"/photos/{i}.jpg" for i in range(len(y))]
    r = find_label_issues(None, y, paths, ["a", "b", "c"], probs=P)
    got = [(s["path"], s["label"], s["suggested"], s["score"]) for s in r["suspects"]]
    assert got == [("/photos/0.jpg", "a", "b", 0.95), ("/photos/13.jpg", "c", "a", 0.8)]
    assert r["suspects"][0]["probs"] == {"b": 0.92, "a": 0.05, "c": 0.03}  # most likely first
    assert r["confused_pairs"] == [{"labelled": "a", "looks_like": "b", "count": 1},
                                   {"labelled": "c", "looks_like": "a", "count": 1}]


def test_a_class_too_small_to_fold_is_skipped_with_the_reason():
    from retrain.mislabels import find_label_issues

    y = np.array([0] * 10 + [1] * 3)
    X = np.random.default_rng(0).normal(size=(13, 8)).astype(np.float32)
    r = find_label_issues(X, y, [f"{i}.jpg" for i in range(13)], ["big", "small"])
    assert r == {"skipped": "class 'small' has 3 photos; the out-of-fold check needs at least 4 per class"}


def test_out_of_fold_predictions_never_see_the_photo_they_judge():
    """A photo whose features are unique noise: a head that trained on it would recall its label;
    out of fold, it gets no better than chance."""
    from retrain.mislabels import out_of_fold_probs

    rng = np.random.default_rng(0)
    X = rng.normal(size=(60, 200)).astype(np.float32)  # pure noise, far more features than photos
    y = np.arange(60) % 3
    P = out_of_fold_probs(X, y, 3, folds=5, l2=1e-4)
    assert (P.argmax(1) == y).mean() < 0.6  # in-sample, this head would score 100%


# ------------------------------------------------------------------------------ real photos

def test_planted_label_errors_rank_first(planted):
    r = label_check(planted)
    top = {str(Path(s["path"]).relative_to(planted)): s["suggested"] for s in r["suspects"][:len(PLANTED)]}
    assert top == {"stripes/planted_circle.jpg": "circle", "squares/planted_stripes.jpg": "stripes"}
    assert r["n"] == 48 and r["folds"] == 5
    assert all(s["score"] > 0.5 for s in r["suspects"][:2])
    pairs = {(p["labelled"], p["looks_like"]) for p in r["confused_pairs"]}
    assert {("stripes", "circle"), ("squares", "stripes")} <= pairs


def test_move_the_suspects_for_review_and_undo(planted_copy, tmp_path):
    from retrain.mislabels import move_suspects, undo_moves

    before = {p.relative_to(planted_copy): p.read_bytes() for p in planted_copy.rglob("*.jpg")}
    sus = label_check(planted_copy)["suspects"]
    review = tmp_path / "review"
    m = move_suspects(sus, planted_copy, review, max_moves=2)
    assert [Path(x["to"]).relative_to(review).as_posix() for x in m["moves"]] == \
        [str(Path(s["path"]).relative_to(planted_copy)) for s in sus[:2]]
    for rel in PLANTED.values():  # moved, relative paths kept, bytes unchanged
        assert not (planted_copy / rel).exists()
        assert (review / rel).read_bytes() == before[Path(rel)]
    manifest = json.loads((review / "manifest.json").read_text())
    assert manifest["complete"] and len(manifest["moves"]) == 2
    assert manifest["undo"] == f"retrain check --undo {review / 'manifest.json'}"

    r = undo_moves(review / "manifest.json")
    assert r["restored"] == 2 and r["missing"] == []
    assert {p.relative_to(planted_copy): p.read_bytes() for p in planted_copy.rglob("*.jpg")} == before
    assert not list(review.rglob("*.jpg"))


def test_a_move_never_overwrites_and_refuses_before_moving(planted_copy, tmp_path):
    from retrain.errors import ConfigError
    from retrain.mislabels import move_suspects

    sus = label_check(planted_copy)["suspects"]
    review = tmp_path / "review"
    second = review / Path(sus[1]["path"]).relative_to(planted_copy)
    second.parent.mkdir(parents=True)
    second.write_bytes(b"the user's own file")
    with pytest.raises(ConfigError, match="already exists; nothing was moved"):
        move_suspects(sus, planted_copy, review, max_moves=2)
    assert Path(sus[0]["path"]).exists() and Path(sus[1]["path"]).exists()  # the first did not move either
    assert second.read_bytes() == b"the user's own file"
    with pytest.raises(ConfigError, match="inside the image folder"):
        move_suspects(sus, planted_copy, planted_copy / "review")


def test_min_score_moves_only_the_sure_ones(planted_copy, tmp_path):
    from retrain.mislabels import move_suspects

    sus = label_check(planted_copy)["suspects"]
    m = move_suspects(sus, planted_copy, tmp_path / "review", min_score=1.01)
    assert m["moves"] == [] and (tmp_path / "review" / "manifest.json").exists()


# ------------------------------------------------------------------------------ after every fit

@pytest.fixture(scope="module")
def planted_run(planted, tmp_path_factory):
    from retrain.config import FitConfig
    from retrain.fit import fit

    out = tmp_path_factory.mktemp("planted-run") / "run"
    report = fit(FitConfig(image_dir=str(planted), output=str(out), quiet=True))
    return out, report


def test_fit_reports_the_planted_errors(planted, planted_run):
    out, report = planted_run
    li = json.loads((out / "report.json").read_text())["label_issues"]
    assert li == json.loads(json.dumps(report["label_issues"]))
    assert {str(Path(s["path"]).relative_to(planted)) for s in li["suspects"][:2]} == set(PLANTED.values())
    assert li["l2"] == report["train"]["l2"]  # the strength the run chose, not a fixed one
    page = (out / "report.html").read_text()
    section = page[page.index('<h2 id="label-issues">'):]
    assert "stripes/planted_circle.jpg" in section and "looks like <b class=\"ok\">circle</b>" in section
    assert section.count('<figure class="suspect"><img src="data:image/jpeg;base64,') == len(li["suspects"])


def test_report_without_cleanlab_or_with_small_classes_says_why(tmp_path):
    from retrain.galleries import label_issues_html

    html = "".join(label_issues_html({"skipped": "class 'a' has 3 photos; the out-of-fold check needs at least 4"}))
    assert 'id="label-issues-skipped"' in html and "class &#x27;a&#x27; has 3 photos" in html
    assert label_issues_html(None) == []  # a report.json from before the label check: no section


def test_report_html_shows_the_suspects_in_a_browser(planted_run, browser):  # noqa: F811
    out, _ = planted_run
    page, refused = open_offline(browser, out / "report.html")
    assert not refused
    captions = page.locator("#label-gallery figcaption").all_inner_texts()
    assert any("stripes/planted_circle.jpg" in c and "in stripes, looks like circle" in c for c in captions[:2])
    assert all(w > 0 for w in images_loaded(page, "#label-gallery img"))  # the thumbnails are there
    assert "stripes" in page.locator("#confused-pairs").inner_text()
