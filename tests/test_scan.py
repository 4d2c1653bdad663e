"""Finding class folders and images, and saying clearly what is wrong with a folder."""

import pytest

from conftest import make_image
from retrain.errors import DataError
from retrain.scan import scan


def test_finds_classes_images_anywhere_inside_and_ignores_junk(tiny_dataset):
    make_image(tiny_dataset / "circle" / "nested" / "deeper" / "c99.png", 0, 99, fmt="PNG")
    (tiny_dataset / "circle" / ".DS_Store").write_bytes(b"\0\0")
    (tiny_dataset / "stripes" / ".ipynb_checkpoints").mkdir()
    make_image(tiny_dataset / "stripes" / ".ipynb_checkpoints" / "x.jpg", 1, 1)
    (tiny_dataset / "squares" / "notes.txt").write_text("hi")
    (tiny_dataset / ".hidden_class").mkdir()
    make_image(tiny_dataset / ".hidden_class" / "h.jpg", 0, 5)
    s = scan(tiny_dataset, quiet=True)
    assert s.classes == ["circle", "squares", "stripes"]
    assert s.counts() == {"circle": 7, "squares": 6, "stripes": 6}
    assert any(p.endswith("notes.txt") for p in s.ignored)
    assert not any(".ipynb_checkpoints" in it.path for it in s.items)


def test_zero_byte_file_is_skipped_with_reason(tiny_dataset):
    (tiny_dataset / "circle" / "empty.jpg").write_bytes(b"")
    s = scan(tiny_dataset, quiet=True)
    assert [sk["reason"] for sk in s.skipped] == ["empty file (0 bytes)"]


def test_duplicates_are_found(tiny_dataset):
    src = tiny_dataset / "circle" / "circle_0.jpg"
    (tiny_dataset / "stripes" / "copy.jpg").write_bytes(src.read_bytes())
    groups = scan(tiny_dataset, quiet=True).duplicates()
    assert len(groups) == 1 and len(groups[0]) == 2


def test_missing_folder(tmp_path):
    with pytest.raises(DataError, match="not found"):
        scan(tmp_path / "nope")


def test_one_level_too_high_suggests_the_right_folder(tiny_dataset):
    outer = tiny_dataset.parent
    with pytest.raises(DataError, match=f"Did you mean {tiny_dataset}"):
        scan(outer)


def test_loose_images_without_class_folders(tmp_path):
    for i in range(3):
        make_image(tmp_path / f"{i}.jpg", 0, i)
    with pytest.raises(DataError, match="its own subfolder"):
        scan(tmp_path)


def test_single_class_is_an_error(tmp_path):
    for i in range(3):
        make_image(tmp_path / "only" / f"{i}.jpg", 0, i)
    with pytest.raises(DataError, match="at least 2 classes"):
        scan(tmp_path)
