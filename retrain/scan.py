"""Scan an image folder: one subfolder per class, images anywhere inside it.

Files are hashed once here (BLAKE2b of the bytes): the digest keys the bottleneck cache,
finds exact duplicates, and keeps duplicates on one side of the split.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from retrain.errors import DataError
from retrain.images import is_image_name
from retrain.progress import bar


@dataclass
class ImageItem:
    path: str  # absolute
    label: str  # class folder name
    digest: str  # hex BLAKE2b-128 of the file's bytes
    nbytes: int


@dataclass
class ScanResult:
    root: str
    classes: list[str]  # sorted class names (folders that hold at least one image file)
    items: list[ImageItem]
    skipped: list[dict] = field(default_factory=list)  # {"path", "reason"}
    ignored: list[str] = field(default_factory=list)  # non-image files, hidden files
    empty_classes: list[str] = field(default_factory=list)  # class folders with no image file

    def counts(self) -> dict[str, int]:
        c = Counter(it.label for it in self.items)
        return {k: c.get(k, 0) for k in self.classes}

    def duplicates(self) -> list[list[str]]:
        """Groups of paths with identical bytes (within or across classes)."""
        groups = defaultdict(list)
        for it in self.items:
            groups[it.digest].append(it.path)
        return [sorted(g) for g in groups.values() if len(g) > 1]


def _hidden(name: str) -> bool:
    return name.startswith(".") or name.startswith("__") or name == "Thumbs.db"


def _walk_images(folder: str, ignored: list[str]) -> list[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not _hidden(d))
        for name in sorted(filenames):
            p = os.path.join(dirpath, name)
            if _hidden(name) or not is_image_name(name):
                ignored.append(p)
            else:
                found.append(p)
    return found


def digest_file(path: str) -> tuple[str, int]:
    h = hashlib.blake2b(digest_size=16)
    n = 0
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
            n += len(chunk)
    return h.hexdigest(), n


def _hint_for(root: Path) -> str:
    """Explain an image dir with no class folders, e.g. one level too high or too low."""
    subdirs = [d for d in sorted(root.iterdir()) if d.is_dir() and not _hidden(d.name)]
    loose = [f for f in root.iterdir() if f.is_file() and is_image_name(f.name)]
    for d in subdirs:
        inner = [x for x in d.iterdir() if x.is_dir() and not _hidden(x.name)]
        if inner and any(_walk_images(str(x), []) for x in inner):
            return f" Did you mean {d}?"
    if loose:
        return (f" It holds {len(loose)} images directly: put each class in its own subfolder"
                f" ({root}/<class>/*.jpg).")
    return " Expected one subfolder per class, e.g. flower_photos/daisy/*.jpg."


def list_class_folders(root: Path) -> list[Path]:
    return [d for d in sorted(root.iterdir()) if d.is_dir() and not _hidden(d.name)]


def scan(image_dir, *, quiet: bool = False, allowed_classes: list[str] | None = None) -> ScanResult:
    """Find class folders and their images, hash every file, note what is left out and why."""
    root = Path(image_dir).expanduser()
    if not root.exists():
        raise DataError(f"image folder not found: {root}")
    if not root.is_dir():
        raise DataError(f"{root} is a file; give the folder that holds one subfolder per class")
    root = root.resolve()
    class_dirs = list_class_folders(root)
    ignored: list[str] = []
    per_class = {d.name: _walk_images(str(d), ignored) for d in class_dirs}
    if not any(per_class.values()):
        raise DataError(f"no class folders with images in {root}.{_hint_for(root)}")
    nonempty = [c for c, ps in per_class.items() if ps]
    if len(nonempty) == 1 and allowed_classes is None:
        only = root / nonempty[0]
        inner = [d for d in list_class_folders(only) if _walk_images(str(d), [])]
        if len(inner) >= 2:  # one level too high: flower_photos/flower_photos/<class>
            raise DataError(f"{root} holds a single folder '{nonempty[0]}' whose subfolders look like "
                            f"classes. Did you mean {only}?")
        raise DataError(f"only one class folder ('{nonempty[0]}') in {root}; a classifier needs "
                        "at least 2 classes, one subfolder each")
    if allowed_classes is not None:
        unknown = [c for c in per_class if c not in allowed_classes and per_class[c]]
        if unknown:
            from retrain.errors import ModelError, did_you_mean

            raise ModelError(
                f"folder '{unknown[0]}' in {root} is not a class the model knows "
                f"({', '.join(allowed_classes)}).{did_you_mean(unknown[0], allowed_classes)}")
    items, skipped = [], []
    paths = [(c, p) for c, ps in per_class.items() for p in ps]
    # Hash in threads: hashlib releases the GIL on large buffers, so reading and hashing overlap.
    from concurrent.futures import ThreadPoolExecutor

    def digest_or_error(p):
        try:
            return digest_file(p)
        except OSError as e:
            return e

    with ThreadPoolExecutor(min(4, (os.cpu_count() or 1) + 1)) as pool:
        results = pool.map(digest_or_error, [p for _, p in paths], chunksize=16)
        for (label, p), res in zip(paths, bar(results, desc="Scanning", total=len(paths), unit="file",
                                              quiet=quiet)):
            if isinstance(res, OSError):
                skipped.append({"path": p, "reason": f"cannot read: {res.strerror or res}"})
                continue
            digest, n = res
            if n == 0:
                skipped.append({"path": p, "reason": "empty file (0 bytes)"})
                continue
            items.append(ImageItem(p, label, digest, n))
    classes = sorted(per_class)
    empty = [c for c in classes if not per_class[c]]
    return ScanResult(str(root), classes, items, skipped, ignored, empty)
