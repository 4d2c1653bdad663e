"""Train / validation / test split: stable across runs and machines, stratified, guaranteed.

The codelab's rule decides: a file's name (minus any `_nohash_...` suffix) is hashed to a
number in [0, 100); below validation_percentage goes to validation, below
validation + testing to test, the rest to training. Adding photos never moves old ones.
On top of it:
  * exact duplicate files share one hash, so they never straddle train and test;
  * every class with >= 3 distinct images gets at least one validation and one test image
    (moved from training, lowest hash first), and keeps at least one training image.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections import defaultdict

from retrain.errors import DataError

MAX_NUM_IMAGES_PER_CLASS = 2**27 - 1  # the codelab's constant: keeps its percentages
MIN_IMAGES_PER_CLASS = 3
SPLITS = ("train", "validation", "test")


def name_bytes(name: str | bytes) -> bytes:
    """A file name as the bytes it has on disk. A UTF-8 name gives its UTF-8 bytes (the codelab's
    hash is unchanged); a byte that is not UTF-8 (Python keeps it as a lone surrogate, 'caf\\udce9')
    gives that byte back instead of raising UnicodeEncodeError. The same on every machine: it
    does not depend on the locale, as os.fsencode would with a legacy file system encoding."""
    if isinstance(name, bytes):
        return name
    try:
        return name.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate that stands for no byte (possible on Windows)
        return name.encode("utf-8", "surrogatepass")


def hash_percentage(file_name: str | bytes) -> float:
    """The codelab's rule: where this file's name falls in [0, 100)."""
    base = re.sub(rb"_nohash_.*$", b"", os.path.basename(name_bytes(file_name)))
    h = int(hashlib.sha1(base).hexdigest(), 16)
    return (h % (MAX_NUM_IMAGES_PER_CLASS + 1)) * (100.0 / MAX_NUM_IMAGES_PER_CLASS)


def check_class_sizes(items, classes) -> None:
    """DataError naming the first class with fewer than MIN_IMAGES_PER_CLASS distinct images.

    `fit` calls it right after the scan (fail before any bottleneck is computed) and again,
    through split_items, once unreadable files have been left out.
    """
    by_class: dict[str, list] = defaultdict(list)
    for it in items:
        by_class[it.label].append(it)
    for c in classes:
        units = {it.digest for it in by_class.get(c, [])}
        n = len(by_class.get(c, []))
        if len(units) < MIN_IMAGES_PER_CLASS:
            extra = f" ({n} files, {len(units)} distinct)" if n != len(units) else ""
            raise DataError(
                f"class '{c}' has {len(units)} usable image{'s' if len(units) != 1 else ''}{extra}; "
                f"each class needs at least {MIN_IMAGES_PER_CLASS} (one each for training, "
                f"validation and test), and 20+ for useful accuracy: add photos or remove the folder")


def split_parts(items, classes, cfg, log) -> tuple:
    """fit's split of `items`: (y, the class index of each item; parts, "train" / "validation" /
    "test" -> indices into items), by split_items with cfg's percentages, the test split cut to
    --test_batch_size photos (a sample drawn with --seed) where it is larger; logged."""
    import numpy as np

    assign = split_items(items, validation_percentage=cfg.validation_percentage,
                         testing_percentage=cfg.testing_percentage, classes=classes)
    y = np.array([classes.index(it.label) for it in items], dtype=np.int64)
    parts = {name: np.array([i for i, it in enumerate(items) if assign[it.path] == name], dtype=np.int64)
             for name in ("train", "validation", "test")}
    if cfg.test_batch_size and cfg.test_batch_size > 0 and len(parts["test"]) > cfg.test_batch_size:
        rng = np.random.default_rng(cfg.seed)
        parts["test"] = np.sort(rng.choice(parts["test"], cfg.test_batch_size, replace=False))
    log(f"Split: {len(parts['train'])} train, {len(parts['validation'])} validation, {len(parts['test'])} test")
    return y, parts


def split_items(items, *, validation_percentage: float = 10.0, testing_percentage: float = 10.0,
                classes=None) -> dict[str, str]:
    """Assign each item (with .path, .label, .digest) to a split. Returns {path: split}.

    Raises DataError naming the first class that is too small to train on.
    """
    classes = classes or sorted({it.label for it in items})
    # Duplicates share the score of the smallest name in their group.
    group_name: dict[str, str] = {}
    for it in items:
        name = re.sub(r"_nohash_.*$", "", os.path.basename(it.path))
        group_name[it.digest] = min(group_name.get(it.digest, name), name)
    score = {d: hash_percentage(n) for d, n in group_name.items()}

    by_class: dict[str, list] = defaultdict(list)
    for it in items:
        by_class[it.label].append(it)
    check_class_sizes(items, classes)

    digest_split: dict[str, str] = {}
    for c in classes:
        units = sorted({it.digest for it in by_class[c]}, key=lambda d: (score[d], d))
        assign = {}
        for d in units:
            if d in digest_split:  # a cross-class duplicate already placed: keep it together
                assign[d] = digest_split[d]
                continue
            p = score[d]
            if p < validation_percentage:
                assign[d] = "validation"
            elif p < validation_percentage + testing_percentage:
                assign[d] = "test"
            else:
                assign[d] = "train"
        # Guarantees: one test, one validation, one train per class; move the lowest-score unit
        # out of the largest split so that the change is small and stable.
        for need in ("test", "validation", "train"):
            if need in assign.values():
                continue
            counts = {s: sum(1 for v in assign.values() if v == s) for s in SPLITS}
            donor = max((s for s in SPLITS if s != need and counts[s] > 1), key=lambda s: counts[s])
            d = next(u for u in units if assign[u] == donor)
            assign[d] = need
        digest_split.update(assign)
    return {it.path: digest_split[it.digest] for it in items}
