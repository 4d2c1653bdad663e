"""The split: the codelab's stable hash rule, plus guarantees it never had."""

from dataclasses import dataclass

import pytest

from retrain.errors import DataError
from retrain.split import hash_percentage, split_items


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
