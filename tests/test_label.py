"""`retrain label`: which files a folder gives, what --json looks like, and "unknown" under the
model's threshold; on the tiny session run and photos made here."""

from __future__ import annotations

import json
import os
import re

import pytest
from PIL import Image

from conftest import make_image, one_error_line, run_cli, with_metadata
from retrain.errors import DataError
from retrain.label import expand_inputs


@pytest.fixture()
def album(tmp_path):
    """A folder of photos in nested subfolders, with hidden files and folders and non-images."""
    root = tmp_path / "album"
    make_image(root / "b.jpg", 0, 1)
    # a PNG of a photo like the training ones (stripes, JPEG-compressed, then stored losslessly):
    # stripes drawn straight to PNG lack the JPEG blur the tiny model learned stripes by, and half
    # of them go to squares, so which way one falls would be this machine's float rounding
    Image.open(make_image(tmp_path / "a.jpg", 1, 2)).save(root / "a.png")
    make_image(root / "2024" / "june" / "deep.jpg", 2, 3)
    make_image(root / "2024" / "c.jpg", 0, 4)
    make_image(root / ".hidden.jpg", 0, 5)  # a hidden photo (macOS ._ files, editors' backups)
    make_image(root / ".thumbnails" / "t.jpg", 0, 6)  # a hidden folder
    (root / "notes.txt").write_text("not a photo")
    (root / "2024" / "june" / "README").write_text("nor this")
    return root


def test_a_folder_gives_its_photos_recursively_sorted_without_hidden_files(album):
    got = [os.path.relpath(p, album) for p in expand_inputs([str(album)])]
    assert got == ["a.png", "b.jpg", os.path.join("2024", "c.jpg"), os.path.join("2024", "june", "deep.jpg")]


def test_files_are_taken_as_given_and_missing_ones_refused(album):
    hidden = str(album / ".hidden.jpg")
    assert expand_inputs([hidden, str(album / "b.jpg")]) == [hidden, str(album / "b.jpg")]  # named: used
    with pytest.raises(DataError, match="image not found: .*nope.jpg"):
        expand_inputs([str(album / "nope.jpg")])
    with pytest.raises(DataError, match="no images found in folder .*thumbnails-empty"):
        (album / "thumbnails-empty" / ".x").mkdir(parents=True)
        expand_inputs([str(album / "thumbnails-empty")])


def test_json_output_shape(tiny_run, album):
    out = json.loads(run_cli("label", tiny_run, album, "--json", "--top-k", "2").stdout)
    assert [os.path.relpath(r["path"], album) for r in out] == ["a.png", "b.jpg", os.path.join("2024", "c.jpg"),
                                                             os.path.join("2024", "june", "deep.jpg")]
    for r in out:
        assert set(r) == {"path", "label", "predictions", "novelty", "unknown"}
        assert [set(p) for p in r["predictions"]] == [{"label", "score"}] * 2
        s = [p["score"] for p in r["predictions"]]
        assert 1 >= s[0] >= s[1] >= 0
        assert r["label"] == ("unknown" if r["unknown"] else r["predictions"][0]["label"])
        assert {p["label"] for p in r["predictions"]} <= {"circle", "stripes", "squares"}
    # make_image's classes: b.jpg and c.jpg are red discs, a.png stripes, deep.jpg squares.
    assert [r["predictions"][0]["label"] for r in out] == ["stripes", "circle", "circle", "squares"]
    # more labels asked than the model has: all of them, once each
    out = json.loads(run_cli("label", tiny_run, album / "b.jpg", "--json", "--top-k", "9").stdout)
    assert sorted(p["label"] for p in out[0]["predictions"]) == ["circle", "squares", "stripes"]
    assert sum(p["score"] for p in out[0]["predictions"]) == pytest.approx(1.0, abs=1e-4)


def test_text_output_one_image_and_many(tiny_run, album):
    one = run_cli("label", tiny_run, album / "b.jpg").stdout.splitlines()
    assert len(one) == 3 and re.fullmatch(r"circle \(score=[01]\.\d{5}\)", one[0]), one
    many = run_cli("label", tiny_run, album / "b.jpg", album / "a.png", "--top-k", "1").stdout.splitlines()
    assert many[0] == str(album / "b.jpg") and many[1].startswith("  circle (score=")
    assert many[2] == str(album / "a.png") and many[3].startswith("  stripes (score=")


def test_a_bad_file_among_good_ones_is_skipped_with_its_reason(tiny_run, album, tmp_path):
    bad = album / "2024" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 truncated")
    p = run_cli("label", tiny_run, album, "--json")
    out = json.loads(p.stdout)
    assert len(out) == 5
    broken = [r for r in out if "error" in r]
    assert [r["path"] for r in broken] == [str(bad)] and set(broken[0]) == {"path", "error"}
    assert f"skipped {bad}: " in p.stderr and p.returncode == 0
    # only bad files: exit 1 with each listed; one bad file: the one error line, exit 2
    (tmp_path / "bad2.jpg").write_bytes(b"")
    p = run_cli("label", tiny_run, bad, tmp_path / "bad2.jpg", check=False)
    assert p.returncode == 1 and p.stderr.count("skipped ") == 2 and p.stdout == ""
    p = run_cli("label", tiny_run, bad, check=False)
    assert p.returncode == 2 and "broken.jpg" in one_error_line(p.stderr)


def test_unknown_under_the_models_threshold(tiny_run, tmp_path):
    """The same photo through the same model with the threshold above, then below its top score."""
    from PIL import Image

    photo = tmp_path / "grey.png"  # like none of the classes: a middling top score
    Image.new("RGB", (64, 64), (128, 128, 128)).save(photo)
    top = json.loads(run_cli("label", tiny_run, photo, "--json").stdout)[0]["predictions"][0]
    assert top["score"] < 0.99, top  # room for a threshold above it
    # (the novelty threshold removed: grey is unlike every training photo, so it alone says unknown)
    above = with_metadata(tiny_run, tmp_path / "strict.onnx", unknown_threshold=(top["score"] + 1) / 2,
                          novelty_threshold=None)
    below = with_metadata(tiny_run, tmp_path / "lenient.onnx", unknown_threshold=top["score"] / 2,
                          novelty_threshold=None)
    r = json.loads(run_cli("label", above, photo, "--json").stdout)[0]
    assert r["label"] == "unknown" and r["predictions"][0] == top  # the scores are still shown
    text = run_cli("label", above, photo).stdout
    assert "-> unknown (top score under the model's threshold)" in text
    r = json.loads(run_cli("label", below, photo, "--json").stdout)[0]
    assert r["label"] == top["label"] and r["predictions"][0] == top
    assert "unknown" not in run_cli("label", below, photo).stdout


def test_the_library_call_returns_what_the_cli_prints(tiny_run, album):
    import retrain

    lib = retrain.label(tiny_run, [str(album)], top_k=2)
    cli = json.loads(run_cli("label", tiny_run, album, "--json", "--top-k", "2").stdout)
    assert [r["path"] for r in lib] == [r["path"] for r in cli]
    assert [r["label"] for r in lib] == [r["label"] for r in cli]
    for a, b in zip(lib, cli):
        assert [p["label"] for p in a["predictions"]] == [p["label"] for p in b["predictions"]]
        assert all(abs(p["score"] - q["score"]) < 1e-5 for p, q in zip(a["predictions"], b["predictions"]))


@pytest.mark.parametrize("args,match", [
    ((), "no images given"),
    (("--top-k", "0"), "--top-k"),
    (("--top-k", "nan"), "--top-k"),
    (("--batch-size", "0"), "--batch-size"),
    (("--input_std", "0"), "--input_std"),
])
def test_bad_arguments_are_one_line(tiny_run, album, args, match):
    extra = () if args == () else (album / "b.jpg",)
    p = run_cli("label", tiny_run, *extra, *args, check=False)
    assert p.returncode == 2, p.stderr
    assert match in one_error_line(p.stderr)
