"""`retrain check DIR` and the cheap checks `fit` runs: on real (generated) images with real problems."""

from __future__ import annotations

import json
import shutil

from conftest import make_dataset, make_image, one_error_line, run_cli


def _distinct(root, classes=("a", "b"), per_class=20):
    """Images that share nothing (random noise at several scales): a folder with no problems."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(1)
    for c in classes:
        for i in range(per_class):
            cells = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
            im = Image.fromarray(cells).resize((96, 96), Image.Resampling.BICUBIC)
            (root / c).mkdir(parents=True, exist_ok=True)
            im.save(root / c / f"{c}_{i}.jpg")
    return root


def _messy(root):
    """A folder with one of each problem `retrain check` should find."""
    from PIL import Image

    make_dataset(root, per_class=6)
    for i in range(6, 34):  # stripes: 35 images, circle/squares 6: imbalanced
        make_image(root / "stripes" / f"stripes_{i}.jpg", 1, 500 + i)
    # the same photo in two classes
    shutil.copy(root / "circle" / "circle_1.jpg", root / "squares" / "moved_circle_1.jpg")
    # a near duplicate in another class: resized and re-encoded, so the bytes differ
    im = Image.open(root / "circle" / "circle_2.jpg")
    im.resize((80, 66)).save(root / "stripes" / "circle_2_small.jpg", quality=60)
    # corrupt files: truncated JPEG, text with a .jpg name
    data = (root / "circle" / "circle_3.jpg").read_bytes()
    (root / "circle" / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (root / "squares" / "notes.jpg").write_text("not a picture\n")
    # tiny image, non-image file, image outside any class, names that differ only in case
    make_image(root / "squares" / "tiny.png", 0, 7, size=(20, 16))
    (root / "circle" / "README.txt").write_text("taken with my phone\n")
    make_image(root / "loose.jpg", 0, 8)
    make_image(root / "circle" / "CIRCLE_0.jpg", 0, 9)
    return root


def test_quick_check_flags_cheap_problems_without_decoding(tmp_path):
    from retrain.check import quick_check
    from retrain.scan import scan

    root = _messy(tmp_path / "messy")
    warnings = quick_check(scan(root, quiet=True))
    text = "\n".join(warnings)
    assert "imbalanced" in text and "'stripes' has 35 images" in text
    assert any("same photo is in classes circle and squares" in w for w in warnings)
    assert "circle/CIRCLE_0.jpg" in text and "upper/lower case" in text
    assert "non-image file(s) ignored: circle/README.txt" in text
    assert "loose.jpg: image outside any class folder" in text
    assert "classes have fewer than 20 images ('circle' 8" in text  # one line for all small classes
    # cheap: nothing was decoded, so the corrupt files and the tiny image are not known yet
    assert "truncated" not in text and "tiny" not in text


def test_quick_check_of_a_clean_folder_says_nothing(tmp_path):
    from retrain.check import quick_check
    from retrain.scan import scan

    root = _distinct(tmp_path / "clean")
    assert quick_check(scan(root, quiet=True)) == []


def test_check_cli_json_finds_corrupt_tiny_and_near_duplicates(tmp_path):
    root = _messy(tmp_path / "messy")
    p = run_cli("check", root, "--json")
    f = json.loads(p.stdout)
    assert f["classes"] == {"circle": 8, "squares": 9, "stripes": 35}
    assert f["imbalance"]["largest"] == "stripes" and f["imbalance"]["smallest"] == "circle"
    corrupt = {c["path"].split("/")[-1]: c["reason"] for c in f["corrupt"]}
    assert set(corrupt) == {"truncated.jpg", "notes.jpg"}
    assert "truncated" in corrupt["truncated.jpg"]
    assert "not an image" in corrupt["notes.jpg"]
    assert [(t["path"].split("/")[-1], t["width"], t["height"]) for t in f["tiny"]] == [("tiny.png", 20, 16)]
    exact = [d for d in f["exact_duplicates"] if d["cross_class"]]
    assert len(exact) == 1 and exact[0]["classes"] == ["circle", "squares"]
    near = [sorted(p.split("/")[-1] for p in g["paths"]) for g in f["near_duplicates"]]
    assert ["circle_2.jpg", "circle_2_small.jpg"] in near
    g = next(g for g in f["near_duplicates"] if any(p.endswith("circle_2_small.jpg") for p in g["paths"]))
    assert g["cross_class"] and g["classes"] == ["circle", "stripes"]
    assert [c["names"] for c in f["name_collisions"]][0][0].endswith("CIRCLE_0.jpg")
    assert [s["path"].split("/")[-1] for s in f["stray"]] == ["loose.jpg"]
    # exact copies are not reported again as near duplicates
    assert not any(any(p.endswith("moved_circle_1.jpg") for p in g["paths"]) for g in f["near_duplicates"])


def test_check_cli_human_readable_and_strict(tmp_path):
    root = _messy(tmp_path / "messy")
    p = run_cli("check", root, "-q", check=False)
    assert p.returncode == 0
    out = p.stdout
    assert "52 images in 3 classes" in out
    assert "corrupt: circle/truncated.jpg: image file is truncated" in out
    assert "near-duplicate photos in classes circle and stripes" in out
    assert "1 tiny image(s)" in out
    assert run_cli("check", root, "-q", "--strict", check=False).returncode == 1
    clean = _distinct(tmp_path / "clean")
    p = run_cli("check", clean, "-q", "--strict", check=False)
    assert p.returncode == 0 and "no problems found" in p.stdout


def test_check_user_errors_are_one_line(tmp_path):
    p = run_cli("check", tmp_path / "nope", check=False)
    assert p.returncode == 2 and p.stderr.strip().count("\n") == 0 and "not found" in p.stderr
    assert "Traceback" not in p.stderr
    make_dataset(tmp_path / "d", per_class=2)
    p = run_cli("check", tmp_path / "d", "--max-distance", "99", check=False)
    assert p.returncode == 2 and "--max-distance must be between 0 and 64" in p.stderr


def test_fit_warns_and_stores_the_warnings(tmp_path):
    root = make_dataset(tmp_path / "d", per_class=8)
    shutil.copy(root / "circle" / "circle_1.jpg", root / "squares" / "oops.jpg")
    out = tmp_path / "run"
    p = run_cli("fit", root, "-o", out, "-q")
    assert "warning: the same photo is in classes circle and squares" in p.stderr
    report = json.loads((out / "report.json").read_text())
    assert any("same photo is in classes circle and squares" in w for w in report["data_warnings"])


# ------------------------------------------------------------------ --labels: mislabelled photos

def _planted(tmp_path):
    """A folder with two photos filed in the wrong class (tests/test_mislabels.py)."""
    from test_mislabels import PLANTED, planted_folder  # skips where cleanlab is not installed

    return planted_folder(tmp_path / "images"), set(PLANTED.values())


def test_check_labels_json_lists_the_planted_errors_first(tmp_path):
    root, planted = _planted(tmp_path)
    f = json.loads(run_cli("check", root, "--labels", "--json", "--no-near").stdout)
    li = f["label_issues"]
    assert {s["path"] for s in li["suspects"][:2]} == {str(root / p) for p in planted}
    assert set(li["suspects"][0]) == {"path", "label", "suggested", "score", "probs"}
    assert set(li) >= {"suspects", "confused_pairs", "n", "folds", "l2", "method", "out_of_fold_accuracy"}
    assert {(p["labelled"], p["looks_like"]) for p in li["confused_pairs"]} >= {("stripes", "circle"),
                                                                                ("squares", "stripes")}
    assert any("may be mislabelled" in w for w in f["warnings"])  # so --strict fails on them


def test_check_labels_moves_the_suspects_for_review_and_undo_puts_them_back(tmp_path, capsys):
    root, planted = _planted(tmp_path)
    before = {p.relative_to(root): p.read_bytes() for p in root.rglob("*.jpg")}
    review = tmp_path / "review"
    p = run_cli("check", root, "--labels", "-q", "--no-near", "--move-to", review, "--max-moves", "2")
    assert "label check: " in p.stdout and "stripes -> circle" in p.stdout
    assert f"moved 2 photo(s) to {review}" in p.stdout
    assert {str(x.relative_to(review)) for x in review.rglob("*.jpg")} == planted  # relative paths kept
    assert not any((root / x).exists() for x in planted)
    manifest = review / "manifest.json"
    assert f"undo all: retrain check --undo {manifest}" in p.stdout
    from retrain.cli import main  # the CLI in this process (saves a start-up a call)

    # a second move into the same review folder is refused: the manifest would be lost
    assert main(["check", str(root), "--labels", "-q", "--move-to", str(review)]) == 2
    assert "manifest.json already exists" in one_error_line(capsys.readouterr().err)

    p = run_cli("check", "--undo", manifest, "--json")
    assert json.loads(p.stdout)["restored"] == 2
    assert {x.relative_to(root): x.read_bytes() for x in root.rglob("*.jpg")} == before
    assert main(["check", "--undo", str(manifest)]) == 2  # twice: nothing left to move back
    assert "already undone" in one_error_line(capsys.readouterr().err)


def test_check_labels_errors_are_one_line(tmp_path, capsys):
    root = make_dataset(tmp_path / "images", per_class=4)
    cases = [
        (("check", root, "--move-to", tmp_path / "r"), "--move-to moves the photos that --labels finds"),
        (("check", root, "--labels", "--move-to", root / "review"), "is inside the image folder"),
        (("check", "--undo", tmp_path / "nope.json"), "not found: give the manifest.json"),
        (("check", "--undo", root / "circle" / "circle_0.jpg"), "cannot read it as a retrain move manifest"),
        (("check", root, "--undo", tmp_path / "m.json"), "--undo MANIFEST moves photos back and does nothing else"),
        (("check", root, "--labels", "--max-moves", "0"), "--max-moves must be a number from 1"),
        (("check",), "no image folder given"),
    ]
    cases.append((("check", "--undo", tmp_path / "m.json"), "not a manifest written by retrain check --move-to"))
    (tmp_path / "m.json").write_text('{"kind": "something else"}')
    from retrain.cli import main  # the CLI in this process: one start-up for all the cases

    for args, expected in cases:
        assert main([str(a) for a in args]) == 2, args
        assert expected in one_error_line(capsys.readouterr().err), args


def test_check_labels_small_classes_and_missing_cleanlab(tmp_path):
    root = make_dataset(tmp_path / "images", per_class=3)
    p = run_cli("check", root, "--labels", "-q", "--no-near", check=False)
    if p.returncode == 0:  # cleanlab installed: the check says why it cannot fold 3 photos a class
        assert "label check skipped: class 'circle' has 3 photos" in p.stdout
    # Without cleanlab (a module of that name that fails to import stands in for its absence):
    # one line saying what to install, before any bottleneck is computed.
    fake = tmp_path / "no-cleanlab"
    (fake / "cleanlab").mkdir(parents=True)
    (fake / "cleanlab" / "__init__.py").write_text("raise ImportError('cleanlab is not installed')\n")
    p = run_cli("check", root, "--labels", check=False, env={"PYTHONPATH": str(fake)})
    assert p.returncode == 2 and "pip install 'retrain[labels]'" in one_error_line(p.stderr)
