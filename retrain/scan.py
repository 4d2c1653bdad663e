"""Scan an image folder: one subfolder per class, images anywhere inside it.

Files are hashed once here (BLAKE2b of the bytes): the digest keys the bottleneck cache,
finds exact duplicates, and keeps duplicates on one side of the split.

The walk trusts nothing it finds. Each real folder is entered once (known by (st_dev, st_ino)),
so symlink loops end and a folder linked twice is not counted twice; a symlinked folder that
points into a class folder (another class's photos would get this class's label) is not
followed; only regular files are opened (a FIFO named x.jpg would block forever, a link to
/dev/zero would never end). Everything left out is listed in ScanResult.skipped with the reason.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from retrain.errors import DataError
from retrain.images import is_image_name
from retrain.progress import bar

PATH_MAX = 4096  # Linux: bytes in a path, with the final NUL; a longer path cannot be opened


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
    skipped: list[dict] = field(default_factory=list)  # {"path", "reason"}: files and folders left out
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


# ---------------------------------------------------------------------------- reasons


def _file_kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "FIFO"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISDIR(mode):
        return "folder"
    return "special file"


def _not_regular(mode: int) -> str:
    return f"not a regular file ({_file_kind(mode)})"


def _too_long(path: str) -> str:
    n = len(os.fsencode(path))
    unit = "characters" if n == len(path) else "bytes"
    return f"path too long ({n:,} {unit}, over {PATH_MAX - 1:,})"


def _os_reason(e: OSError, path: str) -> str:
    """Why a file or folder could not be read, from the error the OS gave."""
    if e.errno == errno.ENAMETOOLONG:
        return _too_long(path)
    if e.errno == errno.ELOOP:
        return "symlink loop: the link points back to itself"
    return f"cannot read: {e.strerror or e}"


def _missing_reason(path: str) -> str:
    try:
        return f"broken symlink: its target {os.readlink(path)} does not exist"
    except OSError:
        return "cannot read: No such file or directory"  # removed since it was listed


class NotRegularFile(OSError):
    """Opened, and found not to be a regular file (it was replaced after the scan looked)."""

    def __init__(self, mode: int):
        super().__init__(_not_regular(mode))
        self.reason = _not_regular(mode)


def _read_reason(e: OSError, path: str) -> str:
    return e.reason if isinstance(e, NotRegularFile) else _os_reason(e, path)


# ---------------------------------------------------------------------------- the walk


def _is_folder(entry: os.DirEntry) -> bool:
    """Whether an entry is a folder or a link to one (an error, e.g. path too long: not a folder,
    and then the file check reports it)."""
    try:
        return entry.is_dir()
    except OSError:
        return False


def _inside(path: str, folder: str) -> bool:
    """Whether real path `path` is `folder` or somewhere below it."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


class _Walk:
    """One scan's walk over all class folders: what was entered, found, ignored and skipped."""

    def __init__(self):
        self.entered: dict[tuple[int, int], str] = {}  # (st_dev, st_ino) -> path it was scanned as
        self.class_reals: dict[str, str] = {}  # real path of each class folder -> class name
        self.ignored: list[str] = []
        self.skipped: list[dict] = []

    def skip(self, path: str, reason: str) -> None:
        self.skipped.append({"path": path, "reason": reason})

    def enter(self, path: str, st: os.stat_result) -> None:
        self.entered[(st.st_dev, st.st_ino)] = path

    def linked_folder_problem(self, real: str, st: os.stat_result, here: str) -> str | None:
        """Why a symlinked folder (real path `real`), found in real folder `here`, must not be
        followed; None when it may be."""
        first = self.entered.get((st.st_dev, st.st_ino))
        if _inside(here, real):
            return (f"symlink loop: already scanned as {first}" if first
                    else f"symlink loop: points to {real}, a folder that holds this one")
        for folder, label in self.class_reals.items():
            if _inside(real, folder):
                return (f"symlink into class folder '{label}': its photos are scanned there, "
                        "with that label, not twice")
        for folder, label in self.class_reals.items():
            if _inside(folder, real):
                return f"symlink to {real}, which holds class folder '{label}': not followed"
        if first:
            return f"symlink to a folder already scanned as {first}"
        return None

    def folder_problem(self, path: str, is_link: bool, here: str) -> tuple[str | None, str, os.stat_result | None]:
        """(reason to skip, real path, stat) of the folder at `path`, found in real folder `here`."""
        try:
            st = os.stat(path)
            real = os.path.realpath(path) if is_link else os.path.join(here, os.path.basename(path))
        except OSError as e:
            return _os_reason(e, path), path, None
        if is_link:
            return self.linked_folder_problem(real, st, here), real, st
        first = self.entered.get((st.st_dev, st.st_ino))  # a bind mount can loop too
        return (f"folder already scanned as {first}" if first else None), real, st

    def image_problem(self, entry: os.DirEntry) -> str | None:
        """Why the file `entry` (with an image's name) cannot be hashed; None when it can."""
        path = entry.path
        try:
            if entry.is_file(follow_symlinks=False):  # a regular file: the listing says so, no stat
                return None
            st = os.stat(path)
        except FileNotFoundError:
            return _missing_reason(path)
        except OSError as e:
            return _os_reason(e, path)
        return None if stat.S_ISREG(st.st_mode) else _not_regular(st.st_mode)

    def listing(self, folder: str) -> list[os.DirEntry]:
        try:
            with os.scandir(folder) as it:
                return sorted(it, key=lambda e: e.name)
        except OSError as e:
            self.skip(folder, _os_reason(e, folder))
            return []

    def images(self, folder: str, real: str) -> list[str]:
        """Image paths under `folder` (real path `real`), in os.walk's order: a folder's files,
        then each subfolder in name order. An explicit stack: no recursion limit on deep trees."""
        found: list[str] = []
        stack = [(folder, real)]
        while stack:
            path, here = stack.pop()
            subfolders = []
            for entry in self.listing(path):
                if _is_folder(entry):
                    if not _hidden(entry.name):
                        subfolders.append(self.subfolder(entry, here))
                elif _hidden(entry.name) or not is_image_name(entry.name):
                    self.ignored.append(entry.path)
                elif (reason := self.image_problem(entry)) is not None:
                    self.skip(entry.path, reason)
                else:
                    found.append(entry.path)
            stack.extend(reversed([s for s in subfolders if s is not None]))
        return found

    def subfolder(self, entry: os.DirEntry, here: str) -> tuple[str, str] | None:
        """(path, real path) of a subfolder to walk, or None (skipped, with the reason noted)."""
        reason, real, st = self.folder_problem(entry.path, entry.is_symlink(), here)
        if reason is not None:
            self.skip(entry.path, reason)
            return None
        self.enter(entry.path, st)
        return entry.path, real


def list_class_folders(root: Path) -> list[Path]:
    return [d for d in sorted(root.iterdir()) if d.is_dir() and not _hidden(d.name)]


def _class_folders(root: Path, walk: _Walk) -> list[tuple[str, str]]:
    """(name, real path) of each class folder to scan. Real folders first claim their place; a
    symlinked one that loops, duplicates or overlaps another class folder is skipped."""
    folders = list_class_folders(root)
    accepted: dict[str, str] = {}
    for d in folders:
        if not d.is_symlink():
            st = os.stat(d)
            accepted[d.name] = str(d)
            walk.class_reals[str(d)] = d.name
            walk.enter(str(d), st)
    for d in folders:
        if d.is_symlink():
            reason, real, st = walk.folder_problem(str(d), True, str(root))
            if reason is not None:
                walk.skip(str(d), reason)
                continue
            accepted[d.name] = real
            walk.class_reals[real] = d.name
            walk.enter(str(d), st)
    return sorted(accepted.items())


def _images_by_class(root: Path, walk: _Walk) -> dict[str, list[str]]:
    return {name: walk.images(str(root / name), real) for name, real in _class_folders(root, walk)}


def _has_images(folder: Path) -> bool:
    """Whether `folder`, taken as a dataset root, has class folders with images (for hints)."""
    try:
        return any(_images_by_class(folder, _Walk()).values())
    except OSError:
        return False


# ---------------------------------------------------------------------------- hashing


def digest_file(path: str) -> tuple[str, int]:
    """(hex BLAKE2b-128, size) of a regular file. Raises NotRegularFile for anything else: it is
    opened without blocking (a FIFO would wait for a writer) and checked once open."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_BINARY", 0)
    fd = os.open(path, flags)
    with open(fd, "rb") as f:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise NotRegularFile(mode)
        h = hashlib.blake2b(digest_size=16)
        n = 0
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
            n += len(chunk)
    return h.hexdigest(), n


def _digest_or_error(path: str):
    try:
        return digest_file(path)
    except OSError as e:
        return e


def _hash_all(per_class: dict[str, list[str]], quiet: bool) -> tuple[list[ImageItem], list[dict]]:
    """Hash every file; (items, skipped) in the scan's order."""
    from concurrent.futures import ThreadPoolExecutor

    items, skipped = [], []
    paths = [(c, p) for c, ps in per_class.items() for p in ps]
    # Hash in threads: hashlib releases the GIL on large buffers, so reading and hashing overlap.
    with ThreadPoolExecutor(min(4, (os.cpu_count() or 1) + 1)) as pool:
        results = pool.map(_digest_or_error, [p for _, p in paths], chunksize=16)
        for (label, p), res in zip(paths, bar(results, desc="Scanning", total=len(paths), unit="file",
                                              quiet=quiet)):
            if isinstance(res, OSError):
                skipped.append({"path": p, "reason": _read_reason(res, p)})
            elif res[1] == 0:
                skipped.append({"path": p, "reason": "empty file (0 bytes)"})
            else:
                items.append(ImageItem(p, label, *res))
    return items, skipped


# ---------------------------------------------------------------------------- checks and scan


def _hint_for(root: Path) -> str:
    """Explain an image dir with no class folders, e.g. one level too high or too low."""
    loose = [f for f in root.iterdir() if f.is_file() and is_image_name(f.name)]
    for d in list_class_folders(root):
        if _has_images(d):
            return f" Did you mean {d}?"
    if loose:
        return (f" It holds {len(loose)} images directly: put each class in its own subfolder"
                f" ({root}/<class>/*.jpg).")
    return " Expected one subfolder per class, e.g. flower_photos/daisy/*.jpg."


def _check_root(image_dir) -> Path:
    root = Path(image_dir).expanduser()
    if not root.exists():
        raise DataError(f"image folder not found: {root}")
    if not root.is_dir():
        raise DataError(f"{root} is a file; give the folder that holds one subfolder per class")
    return root.resolve()


def _check_shape(root: Path, per_class: dict[str, list[str]], allowed_classes: list[str] | None) -> None:
    """DataError (ModelError for unknown classes) when the folder cannot be trained or evaluated on."""
    if not any(per_class.values()):
        raise DataError(f"no class folders with images in {root}.{_hint_for(root)}")
    nonempty = [c for c, ps in per_class.items() if ps]
    if len(nonempty) == 1 and allowed_classes is None:
        only = root / nonempty[0]
        inner = [d for d in list_class_folders(only) if _walk_has_images(d)]
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


def _walk_has_images(folder: Path) -> bool:
    """Whether `folder` holds image files anywhere inside it (safe walk, for hints)."""
    walk = _Walk()
    try:
        st = os.stat(folder)
    except OSError:
        return False
    walk.enter(str(folder), st)
    return bool(walk.images(str(folder), os.path.realpath(folder)))


def scan(image_dir, *, quiet: bool = False, allowed_classes: list[str] | None = None) -> ScanResult:
    """Find class folders and their images, hash every file, note what is left out and why."""
    root = _check_root(image_dir)
    walk = _Walk()
    per_class = _images_by_class(root, walk)
    _check_shape(root, per_class, allowed_classes)
    items, unreadable = _hash_all(per_class, quiet)
    classes = sorted(per_class)
    empty = [c for c in classes if not per_class[c]]
    return ScanResult(str(root), classes, items, walk.skipped + unreadable, walk.ignored, empty)
