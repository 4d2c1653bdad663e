"""The run folder: what `retrain fit` (and `retrain export`) write, and the only place that may
replace one.

    RUN/.retrain-run      the marker: "retrain made this folder" (JSON: version, kind, created)
    RUN/model.onnx        the model (retrain.model writes and reads its metadata)
    RUN/labels.txt        one label a line
    RUN/split.json        which photo went to train / validation / test
    RUN/report.json       what happened (schema REPORT_SCHEMA)
    RUN/report.html       the same for people (retrain.report)
    RUN/exports.json      the exports made from this run (retrain export)

Safety rules (a user's folders are never harmed):
  * a run folder is written in full beside its destination, as `.NAME.tmp-PID`, then swapped in
    with two renames: a crash leaves the old run or the new one, whole;
  * an existing destination is replaced only if it is a run folder (it holds the marker, or
    only files a run holds, from before the marker existed) or an empty folder; an existing
    file, any other folder, the image folder, a folder above it, one inside it that would be
    scanned as a class, the current folder and a mount point are refused before any work;
  * leftovers of killed runs (`.NAME.tmp-PID`, `.NAME.old-PID` whose process is gone and that
    hold the marker) are removed by the next run to the same destination.
"""

from __future__ import annotations

import datetime
import errno
import json
import os
import re
import shutil
from pathlib import Path

from retrain.errors import ConfigError
from retrain.files import write_bytes_atomic, write_json_atomic, write_text_atomic

MARKER = ".retrain-run"
MODEL = "model.onnx"
LABELS = "labels.txt"
SPLIT = "split.json"
REPORT = "report.json"
REPORT_HTML = "report.html"
EXPORTS = "exports.json"
REPORT_SCHEMA = 2
# What a run folder written before the marker existed may hold: such a folder is still a run.
RUN_FILES = frozenset({MODEL, LABELS, SPLIT, REPORT, REPORT_HTML, EXPORTS, MARKER})
_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?:tmp|old)-(?P<pid>\d+)$")


# ------------------------------------------------------------------------- the files of a run

def read_json(path) -> dict:
    from retrain.errors import ModelError

    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ModelError(f"{path} is missing; give a run folder written by `retrain fit`") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ModelError(f"{path} is not valid JSON ({e})") from None



class Run:
    """A run folder's files, read and written here only.

        run = Run("runs/flowers")
        run.report()["metrics"]["test"]["accuracy"];  run.model  # Path of model.onnx
    """

    def __init__(self, folder):
        self.folder = f = Path(folder)
        self.model, self.labels_path, self.report_path, self.split_path = f / MODEL, f / LABELS, f / REPORT, f / SPLIT
        self.report_html = f / REPORT_HTML

    def has_report(self) -> bool:
        return self.report_path.is_file()

    def write_labels(self, labels: list[str]) -> None:
        write_text_atomic(self.labels_path, "".join(f"{c}\n" for c in labels))

    def write_split(self, doc: dict) -> None:
        write_json_atomic(self.folder / SPLIT, doc)

    def split(self) -> dict:
        from retrain.errors import ModelError

        doc = read_json(self.folder / SPLIT)
        files = doc.get("files")
        if not isinstance(files, dict) or not all(isinstance(files.get(k, []), list)
                                                  for k in ("train", "validation", "test")):
            raise ModelError(f"{self.folder / SPLIT} has no 'files' lists for train/validation/test")
        return doc

    def write_report(self, report: dict) -> None:
        """report.json, with the schema version first (see REPORT_SCHEMA)."""
        write_json_atomic(self.folder / REPORT, {"schema": REPORT_SCHEMA, **report})

    def report(self) -> dict:
        return read_json(self.folder / REPORT)

    def exports(self) -> dict:
        """{format: record} of the exports made from this run ({} if none)."""
        p = self.folder / EXPORTS
        if not p.is_file():
            return {}
        try:
            doc = json.loads(p.read_text())
        except (OSError, ValueError):
            return {}
        return doc if isinstance(doc, dict) else {}

    def write_exports(self, index: dict) -> None:
        write_json_atomic(self.folder / EXPORTS, index)

    def note_export(self, fmt: str, out: Path, when: str) -> None:
        """Record an export of this run (`retrain bench RUN` then finds every form)."""
        index = self.exports()
        index[fmt] = {"path": str(Path(out).resolve()), "exported": when}
        self.write_exports(index)

    def export_folders(self) -> dict[str, Path]:
        """{format: folder} of the exports noted in exports.json that still exist."""
        out = {}
        for fmt, rec in self.exports().items():
            path = Path(rec.get("path", "")) if isinstance(rec, dict) else None
            if path and (path / MODEL).is_file():
                out[fmt] = path
        return out

    def image_root(self, image_dir=None) -> Path:
        """Where the run's photos are: `image_dir`, else the report's image_dir (DataError if gone)."""
        from retrain.errors import DataError

        root = Path(image_dir or self.report().get("image_dir") or "").expanduser()
        if not str(root) or not root.is_dir():
            raise DataError(f"the run's photos are not at '{root}' (image_dir in {self.report_path}); "
                            "pass --image-dir DIR where the same class folders are")
        return root


# ------------------------------------------------------------------------- what may be replaced

def is_run_folder(path) -> bool:
    """A folder retrain wrote: it holds the marker, or (a run from before the marker) only the
    files a run holds, with a report that names a retrain version."""
    p = Path(path)
    if not p.is_dir() or p.is_symlink():
        return False
    if (p / MARKER).is_file():
        return True
    names = set(os.listdir(p))
    if not names or not names <= RUN_FILES or REPORT not in names:
        return False
    try:
        return "retrain_version" in json.loads((p / REPORT).read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return False


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def _hidden_part(rel: Path) -> bool:
    return any(part.startswith(".") or part.startswith("__") for part in rel.parts)


def check_destination(out, *, image_dir=None, flag: str = "--output") -> Path:
    """The absolute destination for a run folder, or a ConfigError saying why it may not be
    written. Called before any work, and again just before the swap."""
    given = Path(out).expanduser()
    dest = Path(os.path.abspath(given))
    real = Path(os.path.realpath(given))
    if given.is_symlink():
        raise ConfigError(f"{flag} {given} is a symbolic link; give a real folder (retrain replaces a run "
                          "folder whole, and will not follow a link to do it)")
    if real.exists() and not real.is_dir():
        raise ConfigError(f"{flag} {given} is an existing file; give a folder for the run (retrain never "
                          "overwrites a file it did not write)")
    if image_dir is not None:
        images = Path(os.path.realpath(Path(image_dir).expanduser()))
        if _inside(images, real):
            what = "the image folder" if real == images else "a folder that holds the image folder"
            raise ConfigError(f"{flag} {given} is {what} ({images}); the run must go elsewhere, "
                              "e.g. --output runs/" + images.name)
        if _inside(real, images) and not _hidden_part(real.relative_to(images)):
            raise ConfigError(f"{flag} {given} is inside the image folder {images}, where it would be "
                              "scanned as photos; put the run outside it, e.g. --output runs/" + images.name)
    try:
        cwd = Path(os.path.realpath(os.getcwd()))
    except OSError:
        cwd = None
    if cwd is not None and _inside(cwd, real):
        raise ConfigError(f"{flag} {given} is the current folder or holds it; give a folder of its own "
                          "for the run, e.g. --output runs/NAME")
    _check_writable(real, given, flag)
    if real.is_dir():
        if os.path.ismount(real):
            raise ConfigError(f"{flag} {given} is a mount point, which cannot be swapped; give a folder "
                              "inside it")
        if any(real.iterdir()) and not is_run_folder(real):
            raise ConfigError(f"{flag} {given} is not a run folder: retrain did not write it (it holds "
                              f"{_sample_names(real)}), and it replaces only its own run folders: "
                              "give a new or empty folder")
    return dest


def _check_writable(real: Path, given: Path, flag: str) -> None:
    """Refuse now, not after the training, a destination on a read-only or forbidden folder."""
    anc = real.parent
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    if not os.access(anc, os.W_OK | os.X_OK):
        ro = bool(os.statvfs(anc).f_flag & os.ST_RDONLY)
        why = "it is on a read-only file system" if ro else "permission denied"
        raise ConfigError(f"{flag} {given}: cannot write in {anc} ({why}); choose a folder you can write to")


def _sample_names(p: Path, n: int = 3) -> str:
    names = sorted(os.listdir(p))
    shown = ", ".join(names[:n])
    return shown + (f" and {len(names) - n} more" if len(names) > n else "")


# ------------------------------------------------------------------------- writing a run

def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_leftovers(dest: Path) -> list[Path]:
    """Remove `.NAME.tmp-PID` / `.NAME.old-PID` beside `dest` left by killed runs (their process
    is gone and they hold the marker). Returns what was removed."""
    removed = []
    try:
        entries = list(dest.parent.iterdir())
    except OSError:
        return removed
    for p in entries:
        m = _LEFTOVER.match(p.name)
        if not m or m["name"] != dest.name or _pid_alive(int(m["pid"])):
            continue
        if p.is_dir() and not p.is_symlink() and (p / MARKER).is_file():
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def write_marker(folder: Path, kind: str = "run") -> None:
    from retrain import __version__

    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    write_json_atomic(folder / MARKER, {"retrain": __version__, "kind": kind, "created": stamp})


class RunWriter:
    """Writes a run folder in full beside its destination, then swaps it in.

        with RunWriter(dest, image_dir=...) as tmp:
            ...write files into tmp...
        # here dest is the new run; on an exception the old one is untouched

    The marker is the first file written, so a leftover of a killed writer is recognisable.
    """

    def __init__(self, dest, *, image_dir=None, kind: str = "run", flag: str = "--output"):
        self.image_dir, self.kind, self.flag = image_dir, kind, flag
        self.dest = check_destination(dest, image_dir=image_dir, flag=flag)
        self.tmp = self.dest.parent / f".{self.dest.name}.tmp-{os.getpid()}"

    def __enter__(self) -> Path:
        self.dest.parent.mkdir(parents=True, exist_ok=True)
        clean_leftovers(self.dest)
        if self.tmp.exists():  # ours, from an earlier write in this process
            shutil.rmtree(self.tmp)
        self.tmp.mkdir()
        write_marker(self.tmp, self.kind)
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        try:
            if exc_type is None:
                check_destination(self.dest, image_dir=self.image_dir, flag=self.flag)  # still safe?
                self._swap()
        except OSError as e:
            exc = e
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)
        if isinstance(exc, OSError) and not isinstance(exc, (BrokenPipeError, InterruptedError)):
            if not exc.filename:
                exc.filename = str(self.dest)
            raise ConfigError(f"{self.flag} {self.dest}: {os_error_message(exc)}") from None
        return False

    def _swap(self) -> None:
        dest = self.dest
        if not dest.exists():
            os.replace(self.tmp, dest)
            return
        if not any(dest.iterdir()):
            os.replace(self.tmp, dest)  # rename(2) replaces an empty folder in one step
            return
        old = dest.parent / f".{dest.name}.old-{os.getpid()}"
        os.replace(dest, old)
        try:
            os.replace(self.tmp, dest)
        except OSError:
            os.replace(old, dest)  # put the old run back
            raise
        shutil.rmtree(old, ignore_errors=True)


def write_user_file(dest, data: bytes | str, *, flag: str, looks_ours) -> Path:
    """Write `data` to a path the user named (--output_graph, --output_labels, --html, ...): an
    existing file is replaced, atomically, only when `looks_ours(path)` says retrain wrote it."""
    dest = Path(dest).expanduser()
    if dest.is_dir():
        raise ConfigError(f"{flag} {dest} is a folder; give a file name")
    if dest.exists() and not looks_ours(dest):
        raise ConfigError(f"{flag} {dest} exists and was not written by retrain; give a new file name "
                          "(retrain never overwrites a file it did not write)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        return write_text_atomic(dest, data)
    return write_bytes_atomic(dest, data)


def is_retrain_model(path) -> bool:
    """An ONNX file with retrain's metadata (cheap: the metadata sits at the end of the file)."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - (1 << 20)))
            return b"retrain_version" in f.read()
    except OSError:
        return False


def is_labels_file(path, max_bytes: int = 1 << 20) -> bool:
    """A text file of one short label a line, as retrain writes labels.txt."""
    try:
        if os.path.getsize(path) > max_bytes:
            return False
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return False
    return bool(lines) and all(0 < len(s) <= 256 and s == s.strip() for s in lines)


def os_error_message(e: OSError) -> str:
    """One line for a system error while reading or writing the user's files."""
    where = e.filename if e.filename is not None else ""
    where = (os.fsdecode(where) if isinstance(where, bytes) else str(where)) or "the output or cache folder"
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"no space left on the disk that holds {where}: free some space, or write elsewhere " \
               "(--output, --cache-dir); nothing already written was damaged"
    if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return f"cannot write {where} ({e.strerror}): choose a folder you can write to " \
               "(--output, --cache-dir)"
    if e.errno == errno.ENAMETOOLONG:
        return f"a path is too long for the file system ({where[:120]}...): use shorter folder names"
    return f"{e.strerror or e}: {where}" if where else f"{e.strerror or e}"
