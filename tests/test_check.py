"""`retrain check DIR` and the cheap checks `fit` runs: on real (generated) images with real problems."""

from __future__ import annotations

import json
import shutil

from conftest import make_dataset, make_image, run_cli


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
