"""Finding class folders and images, and saying clearly what is wrong with a folder."""

import json
import os
import subprocess
import sys

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


# ------------------------------------------------------------------ links, special files, long paths


def _check_json(root, timeout=20):
    """`retrain check DIR --json` in a real process that must end soon, however the folder is
    built. Its memory is capped: the old walk of a symlink loop grew by ~70 MB a second."""
    import resource

    def cap():
        resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))

    p = subprocess.run([sys.executable, "-m", "retrain", "check", str(root), "--json", "--no-near", "-q"],
                       capture_output=True, text=True, timeout=timeout, preexec_fn=cap)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def _reasons(skipped, root):
    return {os.path.relpath(sk["path"], root): sk["reason"] for sk in skipped}


def test_two_links_to_the_class_folder_end_quickly_and_are_reported(tiny_dataset):
    # Before: os.walk(followlinks=True) walked a/b/a/b/... (2^40 folders): check never ended.
    os.symlink(".", tiny_dataset / "circle" / "a")
    os.symlink(".", tiny_dataset / "circle" / "b")
    f = _check_json(tiny_dataset)
    assert f["classes"] == {"circle": 6, "squares": 6, "stripes": 6}
    reasons = _reasons(f["unreadable"], tiny_dataset)
    assert reasons == {"circle/a": f"symlink loop: already scanned as {tiny_dataset / 'circle'}",
                       "circle/b": f"symlink loop: already scanned as {tiny_dataset / 'circle'}"}
    assert any("skipped circle/a: symlink loop" in w for w in f["warnings"])


def test_self_link_and_link_to_another_class_count_every_photo_once(tiny_dataset):
    # Before: 6 circles counted as hundreds, and every stripes photo also trained as a circle.
    from retrain.check import quick_check

    os.symlink(".", tiny_dataset / "circle" / "self")
    os.symlink("../stripes", tiny_dataset / "circle" / "stripes")
    s = scan(tiny_dataset, quiet=True)
    assert s.counts() == {"circle": 6, "squares": 6, "stripes": 6}
    assert all(it.label == os.path.relpath(it.path, tiny_dataset).split(os.sep)[0] for it in s.items)
    assert s.duplicates() == []
    assert _reasons(s.skipped, tiny_dataset) == {
        "circle/self": f"symlink loop: already scanned as {tiny_dataset / 'circle'}",
        "circle/stripes": "symlink into class folder 'stripes': its photos are scanned there, "
                          "with that label, not twice"}
    warnings = "\n".join(quick_check(s))  # what `fit` prints: the skipped link, not a mislabelling
    assert "skipped circle/stripes: symlink into class folder 'stripes'" in warnings
    assert "labelled 'circle'" not in warnings


def test_links_to_folders_above_the_class_folder_are_loops(tiny_dataset):
    # Before: each walked the whole dataset again inside itself, without end.
    os.symlink("..", tiny_dataset / "squares" / "up")
    os.symlink("../..", tiny_dataset / "squares" / "up_twice")
    os.symlink(".", tiny_dataset / "root_again")  # a "class folder" that is the dataset itself
    f = _check_json(tiny_dataset)
    assert f["classes"] == {"circle": 6, "squares": 6, "stripes": 6}
    assert _reasons(f["unreadable"], tiny_dataset) == {
        "squares/up": f"symlink loop: points to {tiny_dataset}, a folder that holds this one",
        "squares/up_twice": f"symlink loop: points to {tiny_dataset.parent}, a folder that holds this one",
        "root_again": f"symlink loop: points to {tiny_dataset}, a folder that holds this one"}


def test_fifo_and_link_to_a_device_with_image_names_are_skipped_not_opened(tiny_dataset):
    # Before: opening the FIFO waited for a writer forever (Ctrl-C did not help: a worker thread
    # was stuck in open()), and /dev/zero was hashed forever.
    os.mkfifo(tiny_dataset / "stripes" / "x.jpg")
    os.symlink("/dev/zero", tiny_dataset / "squares" / "zero.jpg")
    os.symlink("no_such_file.jpg", tiny_dataset / "squares" / "broken.jpg")
    f = _check_json(tiny_dataset)
    assert f["classes"] == {"circle": 6, "squares": 6, "stripes": 6}
    assert _reasons(f["unreadable"], tiny_dataset) == {
        "stripes/x.jpg": "not a regular file (FIFO)",
        "squares/zero.jpg": "not a regular file (device)",
        "squares/broken.jpg": "broken symlink: its target no_such_file.jpg does not exist"}


def test_digest_file_refuses_a_fifo_without_waiting(tmp_path):
    # The scan checks before hashing; a file replaced by a FIFO in between must not block either.
    fifo = tmp_path / "late.jpg"
    os.mkfifo(fifo)
    code = ("import sys\nfrom retrain.scan import digest_file\n"
            "try:\n    digest_file(sys.argv[1])\nexcept OSError as e:\n    print(getattr(e, 'reason', e))\n")
    p = subprocess.run([sys.executable, "-c", code, str(fifo)], capture_output=True, text=True, timeout=20)
    assert p.stdout.strip() == "not a regular file (FIFO)", p.stderr


def test_folder_linked_from_two_classes_is_scanned_once(tiny_dataset, tmp_path):
    # Links to photos outside the dataset are followed (a common way to assemble one), but once.
    outside = tmp_path / "elsewhere"
    for i in range(3):
        make_image(outside / f"o{i}.jpg", 2, 300 + i)
    os.symlink(outside, tiny_dataset / "circle" / "more")
    os.symlink(outside, tiny_dataset / "stripes" / "more")
    s = scan(tiny_dataset, quiet=True)
    assert s.counts() == {"circle": 9, "squares": 6, "stripes": 6}
    assert _reasons(s.skipped, tiny_dataset) == {
        "stripes/more": f"symlink to a folder already scanned as {tiny_dataset / 'circle' / 'more'}"}


def test_class_folders_that_are_links(tiny_dataset, tmp_path):
    # A class folder may be a link to photos elsewhere; a link to another class is not a class.
    outside = tmp_path / "stars"
    for i in range(3):
        make_image(outside / f"s{i}.jpg", 0, 400 + i)
    os.symlink(outside, tiny_dataset / "stars")
    os.symlink("circle", tiny_dataset / "circle_again")
    s = scan(tiny_dataset, quiet=True)
    assert s.counts() == {"circle": 6, "squares": 6, "stars": 3, "stripes": 6}
    reasons = _reasons(s.skipped, tiny_dataset)
    assert reasons == {
        "circle_again": "symlink into class folder 'circle': its photos are scanned there, with that label, "
                        "not twice"}


def _deep_folder(parent, length):
    """Nested folders (names of at most 200 characters) whose path is exactly `length` long.
    Made relative to an open folder (dir_fd): a path this long cannot be given to mkdir whole.
    Returns (open fd of the deepest folder, its path)."""
    fd = os.open(parent, os.O_RDONLY)
    path = str(parent)
    while len(path) < length:
        name = "d" * min(200, length - len(path) - 1)
        if length - len(path) - 1 - len(name) == 1:  # the next name could not be 0 characters long
            name = name[:-1]
        os.mkdir(name, dir_fd=fd)
        nfd = os.open(name, os.O_RDONLY, dir_fd=fd)
        os.close(fd)
        fd, path = nfd, os.path.join(path, name)
    assert len(path) == length
    return fd, path


def _write_at(fd, name, data):
    out = os.open(name, os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
    os.write(out, data)
    os.close(out)


def test_photos_under_a_path_too_long_to_open_are_reported(tiny_dataset):
    # Before: os.walk dropped the folders it could not list: the photos were silently missing.
    photo = (tiny_dataset / "circle" / "circle_0.jpg").read_bytes()
    fd, deep = _deep_folder(tiny_dataset / "circle", 4200)  # a folder whose own path is too long
    _write_at(fd, "lost.jpg", photo)
    os.close(fd)
    fd, near = _deep_folder(tiny_dataset / "stripes", 3900)  # a folder that can be listed...
    _write_at(fd, "n" * 200 + ".jpg", photo)  # ...holding a file whose path is too long
    os.close(fd)
    s = scan(tiny_dataset, quiet=True)
    assert s.counts() == {"circle": 6, "squares": 6, "stripes": 6}
    too_long = [sk for sk in s.skipped if sk["reason"].startswith("path too long")]
    assert len(too_long) == 2, s.skipped
    # The first folder on the way down whose path is too long (where that is depends on how long
    # the temporary folder's own path is).
    folder = next(sk for sk in too_long if deep.startswith(sk["path"]))
    assert 4095 < len(folder["path"]) <= len(deep)
    assert folder["reason"] == f"path too long ({len(folder['path']):,} characters, over 4,095)"
    file_ = next(sk for sk in too_long if not deep.startswith(sk["path"]))
    assert file_["path"].startswith(near) and len(file_["path"]) == 4105
    assert file_["reason"] == "path too long (4,105 characters, over 4,095)"

