"""What `retrain check` finds, and how it says it. `scan_findings(scan_result)` is everything
the scan alone tells (file names, sizes, BLAKE2b digests; no image decoded): counts and
imbalance, tiny classes, empty class folders, exact duplicates (and the same photo in two
classes), file or class names that collide when lower-cased, non-image files, images outside
any class. `warning_lines(findings)`: one line per finding for people, these and the ones of
the full check (corrupt and tiny images, near duplicates, mislabelled photos).
"""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path

from retrain.near_duplicates import MAX_PAIRS

MIN_PER_CLASS = 20  # the codelab's warning: fewer than 20 images per class is too few
IMBALANCE_RATIO = 3.0  # largest class / smallest class above this: say so
MAX_LISTED = 20  # examples listed per finding in the human-readable output


def rel(path: str, root: str) -> str:
    try:
        return os.path.relpath(path, root)
    except ValueError:
        return path


def examples(paths, root, n=3) -> str:
    shown = ", ".join(rel(p, root) for p in paths[:n])
    return shown + (f" and {len(paths) - n} more" if len(paths) > n else "")


def scan_findings(s) -> dict:
    """Everything that the scan alone can tell: no image is decoded."""
    root = s.root
    counts = s.counts()
    nonzero = {c: n for c, n in counts.items() if n}
    findings: dict = {"root": root, "classes": counts, "total": int(sum(counts.values()))}
    if nonzero:
        big = max(nonzero, key=nonzero.get)
        small = min(nonzero, key=nonzero.get)
        findings["imbalance"] = {"largest": big, "largest_count": nonzero[big], "smallest": small,
                                 "smallest_count": nonzero[small],
                                 "ratio": round(nonzero[big] / nonzero[small], 2)}
    findings["small_classes"] = {c: n for c, n in nonzero.items() if n < MIN_PER_CLASS}
    findings["empty_classes"] = list(s.empty_classes)
    findings["exact_duplicates"] = _exact_duplicates(s)
    findings["name_collisions"] = _name_collisions(s)
    hidden = [p for p in s.ignored if os.path.basename(p).startswith(".") or os.path.basename(p) == "Thumbs.db"]
    hidden = set(hidden)
    findings["non_image_files"] = [p for p in s.ignored if p not in hidden]
    findings["unreadable"] = list(s.skipped)
    findings["stray"] = _stray(s)
    return findings


def _exact_duplicates(s) -> list[dict]:
    """Groups of files with the same digest, the ones across classes first."""
    label_of = {it.path: it.label for it in s.items}
    groups = defaultdict(list)
    for it in s.items:
        groups[it.digest].append(it.path)
    dups = []
    for paths in groups.values():
        if len(paths) > 1:
            paths = sorted(paths)
            classes = sorted({label_of[p] for p in paths})
            dups.append({"paths": paths, "classes": classes, "cross_class": len(classes) > 1})
    return sorted(dups, key=lambda d: (not d["cross_class"], d["paths"][0]))


def _name_collisions(s) -> list[dict]:
    """Names that differ only in case: two classes on Linux, one folder on macOS/Windows."""
    collisions = []
    by_lower = defaultdict(list)
    for c in s.classes:
        by_lower[c.lower()].append(c)
    collisions += [{"kind": "class", "names": sorted(v)} for v in by_lower.values() if len(v) > 1]
    files = defaultdict(list)
    for it in s.items:
        files[os.path.join(os.path.dirname(it.path), os.path.basename(it.path).lower())].append(it.path)
    collisions += [{"kind": "file", "names": sorted(v)} for v in files.values() if len(v) > 1]
    return collisions


def _stray(s) -> list[dict]:
    """Images outside any class folder, class-named folders inside another class, empty classes."""
    stray = []
    rootp = Path(s.root)
    from retrain.images import is_image_name

    try:
        for f in sorted(rootp.iterdir()):
            if f.is_file() and is_image_name(f.name):
                stray.append({"path": str(f), "reason": "image outside any class folder (not used)"})
    except OSError:
        pass
    class_names = set(s.classes)
    for c in s.classes:
        cdir = rootp / c
        try:
            # A symlink is not followed into another class's folder: the scan skips it and says so.
            subs = [d for d in cdir.iterdir() if d.is_dir() and not d.is_symlink() and not d.name.startswith(".")]
        except OSError:
            continue
        for d in subs:
            if d.name in class_names and d.name != c:
                stray.append({"path": str(d), "reason": f"folder named like class '{d.name}' inside class "
                              f"'{c}': its images are labelled '{c}'"})
    for c in s.empty_classes:
        stray.append({"path": str(rootp / c), "reason": "class folder with no images (ignored)"})
    return stray


def _balanced_hint() -> str:
    from dataclasses import fields

    from retrain.config import FitConfig

    return " or --class_weights balanced" if "class_weights" in {f.name for f in fields(FitConfig)} else ""


def warning_lines(f: dict) -> list[str]:
    """One line per finding, for people."""
    return _scan_warnings(f) + _decode_warnings(f)


def _scan_warnings(f: dict) -> list[str]:
    """The lines of the findings of the scan (scan_findings)."""
    root = f["root"]
    w = []
    im = f.get("imbalance")
    if im and im["ratio"] > IMBALANCE_RATIO:
        w.append(f"classes are imbalanced: '{im['largest']}' has {im['largest_count']} images, "
                 f"'{im['smallest']}' {im['smallest_count']} ({im['ratio']:g}x); consider more photos of "
                 f"the small class{_balanced_hint()}")
    small = sorted(f["small_classes"].items(), key=lambda kv: kv[1])
    if len(small) == 1:
        c, n = small[0]
        w.append(f"class '{c}' has only {n} images (at least {MIN_PER_CLASS} recommended; its "
                 "validation/test figures will be noisy)")
    elif small:
        listed = ", ".join(f"'{c}' {n}" for c, n in small[:8]) + (", ..." if len(small) > 8 else "")
        w.append(f"{len(small)} classes have fewer than {MIN_PER_CLASS} images ({listed}): at least "
                 f"{MIN_PER_CLASS} each recommended; validation/test figures will be noisy")
    cross = [d for d in f["exact_duplicates"] if d["cross_class"]]
    same = [d for d in f["exact_duplicates"] if not d["cross_class"]]
    for d in cross[:MAX_LISTED]:
        w.append(f"the same photo is in classes {' and '.join(d['classes'])}: {examples(d['paths'], root)}")
    if len(cross) > MAX_LISTED:
        w.append(f"... and {len(cross) - MAX_LISTED} more photos found in two classes")
    if same:
        extra = sum(len(d["paths"]) - 1 for d in same)
        w.append(f"{extra} exact duplicate file(s) within a class in {len(same)} group(s) "
                 f"(kept on one side of the split), e.g. {examples(same[0]['paths'], root, 2)}")
    for col in f["name_collisions"][:MAX_LISTED]:
        what = "class folders" if col["kind"] == "class" else "files"
        w.append(f"{what} differ only in upper/lower case (one name on macOS/Windows): "
                 f"{examples(col['names'], root)}")
    if f["non_image_files"]:
        w.append(f"{len(f['non_image_files'])} non-image file(s) ignored: {examples(f['non_image_files'], root)}")
    for u in f["unreadable"][:MAX_LISTED]:  # everything the scan left out: unreadable files, loops...
        w.append(f"skipped {rel(u['path'], root)}: {u['reason']}")
    if len(f["unreadable"]) > MAX_LISTED:
        w.append(f"... and {len(f['unreadable']) - MAX_LISTED} more skipped")
    for st in f["stray"][:MAX_LISTED]:
        w.append(f"{rel(st['path'], root)}: {st['reason']}")
    return w


def _decode_warnings(f: dict) -> list[str]:
    """The lines of the findings of the full check: decoded images, near duplicates, labels."""
    root = f["root"]
    w = []
    for c in f.get("corrupt", [])[:MAX_LISTED]:
        w.append(f"corrupt: {rel(c['path'], root)}: {c['reason']}")
    if len(f.get("corrupt", [])) > MAX_LISTED:
        w.append(f"... and {len(f['corrupt']) - MAX_LISTED} more corrupt files")
    if f.get("tiny"):
        t = f["tiny"]
        w.append(f"{len(t)} tiny image(s) (shorter side under {f['tiny_side']} px), e.g. "
                 + ", ".join(f"{rel(x['path'], root)} ({x['width']}x{x['height']})" for x in t[:3]))
    near = f.get("near_duplicates", [])
    ncross = [d for d in near if d["cross_class"]]
    for d in ncross[:MAX_LISTED]:
        w.append(f"near-duplicate photos in classes {' and '.join(d['classes'])} (distance "
                 f"{d['distance']}): {examples(d['paths'], root)}")
    if f.get("near_truncated"):
        w.append(f"over {MAX_PAIRS:,} near-duplicate pairs: the search stopped early (many near-identical "
                 "images, e.g. blank frames?); try a smaller --max-distance")
    li = f.get("label_issues") or {}
    if li.get("suspects"):
        w.append(f"{len(li['suspects'])} photo(s) may be mislabelled (their folder disagrees with out-of-fold "
                 f"predictions), e.g. {examples([s['path'] for s in li['suspects']], root)}; see the label check")
    if len(near) - len(ncross):
        w.append(f"{len(near) - len(ncross)} group(s) of near-duplicate photos within a class "
                 "(resized/re-encoded copies; they may leak between train and test)")
    return w
