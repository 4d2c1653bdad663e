"""The split: the codelab's stable hash rule, plus guarantees it never had."""

import hashlib
import json
import os
from dataclasses import dataclass

import pytest

from conftest import make_dataset, make_image, run_cli
from retrain.errors import DataError
from retrain.split import MAX_NUM_IMAGES_PER_CLASS, hash_percentage, split_items


@dataclass
class It:
    path: str
    label: str
    digest: str


def _items(n_per_class=50, classes=("a", "b")):
    return [It(f"/d/{c}/img_{i}.jpg", c, f"{c}{i:030d}") for c in classes for i in range(n_per_class)]


def test_codelab_rule_ignores_nohash_suffix():
    assert hash_percentage("/x/photo_nohash_1.jpg") == hash_percentage("/y/photo_nohash_2.jpg")
    assert hash_percentage("/x/photo.jpg") != hash_percentage("/x/photo2.jpg")
    assert 0 <= hash_percentage("anything.jpg") < 100


def test_stable_and_roughly_proportional():
    items = _items(500)
    a = split_items(items, validation_percentage=10, testing_percentage=10)
    b = split_items(list(reversed(items)), validation_percentage=10, testing_percentage=10)
    assert a == b
    frac = sum(v == "test" for v in a.values()) / len(a)
    assert 0.06 < frac < 0.14


def test_adding_photos_does_not_move_old_ones():
    items = _items(100)
    before = split_items(items)
    after = split_items(items + [It(f"/d/a/new_{i}.jpg", "a", f"new{i:029d}") for i in range(40)])
    assert all(after[p] == s for p, s in before.items())


def test_every_class_with_three_images_gets_validation_and_test():
    items = _items(3, classes=("a", "b", "c", "d", "e", "f"))
    s = split_items(items)
    for c in "abcdef":
        got = sorted(s[it.path] for it in items if it.label == c)
        assert got == ["test", "train", "validation"]


def test_duplicates_never_straddle_splits():
    items = _items(60)
    # Every a-image has an identical copy under another name.
    items += [It(f"/d/a/copy_{i}.jpg", "a", f"a{i:030d}") for i in range(60)]
    s = split_items(items)
    by_digest = {}
    for it in items:
        by_digest.setdefault(it.digest, set()).add(s[it.path])
    assert all(len(v) == 1 for v in by_digest.values())


@pytest.mark.parametrize("n", [0, 1, 2])
def test_too_small_class_says_what_it_has_and_needs(n):
    items = _items(10, classes=("big",)) + _items(n, classes=("tiny",))
    with pytest.raises(DataError, match=f"class 'tiny' has {n} usable image.*at least 3"):
        split_items(items, classes=["big", "tiny"])


def _codelab(name: str | bytes) -> float:
    """The codelab's which_set(): re.sub(r'_nohash_.*$', '', name), then SHA-1 of its bytes."""
    import re

    if isinstance(name, str):
        base = re.sub(r"_nohash_.*$", "", name).encode("utf-8")  # compat.as_bytes
    else:
        base = re.sub(rb"_nohash_.*$", b"", name)
    h = int(hashlib.sha1(base).hexdigest(), 16)
    return (h % (MAX_NUM_IMAGES_PER_CLASS + 1)) * (100.0 / MAX_NUM_IMAGES_PER_CLASS)


@pytest.mark.parametrize("name", ["photo.jpg", "café.jpg", "花_nohash_2.jpg", "Ünïcødé photo (1).png"])
def test_utf8_names_hash_as_in_the_codelab(name):
    # The codelab hashed name.encode("utf-8"): every existing split stays where it was.
    assert hash_percentage(f"/d/x/{name}") == _codelab(name)


def test_a_name_that_is_not_utf8_hashes_its_bytes():
    # Before: UnicodeEncodeError ('surrogates not allowed') for a file named b"caf\xe9.jpg".
    name = os.fsdecode(b"caf\xe9.jpg")  # Python keeps the byte 0xE9 as the lone surrogate \udce9
    assert hash_percentage(f"/d/x/{name}") == _codelab(b"caf\xe9.jpg")
    assert hash_percentage(b"/d/x/caf\xe9.jpg") == _codelab(b"caf\xe9.jpg")
    items = _items(5) + [It(f"/d/a/{name}", "a", "e" * 32)]
    assert split_items(items)[f"/d/a/{name}"] in ("train", "validation", "test")


@pytest.mark.slow  # a real fit: ~3 s, ~7 s when it is the session's first (the backbone's export)
def test_fit_on_a_folder_with_a_name_that_is_not_utf8(tmp_path):
    # A photo copied from an old camera card or a Latin-1 system: fit must train on it, and
    # split.json must name it (JSON escapes the byte as \udce9, which reads back as the same name).
    data = make_dataset(tmp_path / "images", per_class=4)
    name = os.fsdecode(b"caf\xe9.jpg")
    make_image(data / "circle" / name, 0, 77)
    out = tmp_path / "run"
    # A UTF-8 terminal that refuses what it cannot encode, as most desktops have.
    run_cli("fit", data, "-o", out, "-q", env={"PYTHONIOENCODING": "utf-8:strict"}, timeout=300)
    split = json.loads((out / "split.json").read_text())
    files = [f for part in split["files"].values() for f in part]
    assert os.path.join("circle", name) in files
    assert len(files) == 13
    report = json.loads((out / "report.json").read_text())
    assert report["class_counts"] == {"circle": 5, "squares": 4, "stripes": 4}
