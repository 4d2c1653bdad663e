"""`retrain check DIR`: look at an image folder before training on it.

Two levels:
- `quick_check(scan_result)`: what `fit` runs on every start. Cheap: it uses only the scan
  (file names, sizes, BLAKE2b digests), never decodes an image. Counts and imbalance, tiny
  classes, empty class folders, exact duplicates (and the same photo in two classes), file
  or class names that collide when lower-cased, non-image files, images outside any class.
- `check(image_dir)`: all of that, plus every image decoded (small, via JPEG draft mode):
  corrupt/unreadable files with the reason, tiny images, and near duplicates found with a
  perceptual hash (pHash from the `imagehash` package, Hamming distance <= threshold).
- `--labels` (`label_issues(scan_result)`): photos whose folder label disagrees with
  out-of-fold predictions on the cached bottlenecks (retrain.mislabels: confident learning),
  with the suggested label and the class pairs most confused; `--move-to REVIEW/` moves them
  into a review folder (keeping their relative paths, with a manifest) and `--undo` moves them back.
"""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path

import numpy as np

# Thresholds (one place; each is a flag of `retrain check` too).
MIN_PER_CLASS = 20  # the codelab's warning: fewer than 20 images per class is too few
IMBALANCE_RATIO = 3.0  # largest class / smallest class above this: say so
TINY_SIDE = 64  # shorter side below this many pixels: upscaled a lot to the backbone's input
NEAR_DISTANCE = 6  # pHash Hamming distance (of 64 bits) at or below which two images look alike
MAX_LISTED = 20  # examples listed per finding in the human-readable output
MAX_PAIRS = 1_000_000  # near-duplicate pairs kept before the search stops (memory bound)


def _rel(path: str, root: str) -> str:
    try:
        return os.path.relpath(path, root)
    except ValueError:
        return path


def _examples(paths, root, n=3) -> str:
    shown = ", ".join(_rel(p, root) for p in paths[:n])
    return shown + (f" and {len(paths) - n} more" if len(paths) > n else "")


def _cheap_findings(s) -> dict:
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
    findings["exact_duplicates"] = sorted(dups, key=lambda d: (not d["cross_class"], d["paths"][0]))

    # Names that differ only in case: two classes on Linux, one folder on macOS/Windows.
    collisions = []
    by_lower = defaultdict(list)
    for c in s.classes:
        by_lower[c.lower()].append(c)
    collisions += [{"kind": "class", "names": sorted(v)} for v in by_lower.values() if len(v) > 1]
    files = defaultdict(list)
    for it in s.items:
        files[os.path.join(os.path.dirname(it.path), os.path.basename(it.path).lower())].append(it.path)
    collisions += [{"kind": "file", "names": sorted(v)} for v in files.values() if len(v) > 1]
    findings["name_collisions"] = collisions

    hidden = [p for p in s.ignored if os.path.basename(p).startswith(".") or os.path.basename(p) == "Thumbs.db"]
    hidden = set(hidden)
    findings["non_image_files"] = [p for p in s.ignored if p not in hidden]
    findings["unreadable"] = list(s.skipped)

    stray = []
    rootp = Path(root)
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
    findings["stray"] = stray
    return findings


def _balanced_hint() -> str:
    from dataclasses import fields

    from retrain.config import FitConfig

    return " or --class_weights balanced" if "class_weights" in {f.name for f in fields(FitConfig)} else ""


def _warnings(f: dict) -> list[str]:
    """One line per finding, for people."""
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
        w.append(f"the same photo is in classes {' and '.join(d['classes'])}: {_examples(d['paths'], root)}")
    if len(cross) > MAX_LISTED:
        w.append(f"... and {len(cross) - MAX_LISTED} more photos found in two classes")
    if same:
        extra = sum(len(d["paths"]) - 1 for d in same)
        w.append(f"{extra} exact duplicate file(s) within a class in {len(same)} group(s) "
                 f"(kept on one side of the split), e.g. {_examples(same[0]['paths'], root, 2)}")
    for col in f["name_collisions"][:MAX_LISTED]:
        what = "class folders" if col["kind"] == "class" else "files"
        w.append(f"{what} differ only in upper/lower case (one name on macOS/Windows): "
                 f"{_examples(col['names'], root)}")
    if f["non_image_files"]:
        w.append(f"{len(f['non_image_files'])} non-image file(s) ignored: {_examples(f['non_image_files'], root)}")
    for u in f["unreadable"][:MAX_LISTED]:  # everything the scan left out: unreadable files, loops...
        w.append(f"skipped {_rel(u['path'], root)}: {u['reason']}")
    if len(f["unreadable"]) > MAX_LISTED:
        w.append(f"... and {len(f['unreadable']) - MAX_LISTED} more skipped")
    for st in f["stray"][:MAX_LISTED]:
        w.append(f"{_rel(st['path'], root)}: {st['reason']}")
    for c in f.get("corrupt", [])[:MAX_LISTED]:
        w.append(f"corrupt: {_rel(c['path'], root)}: {c['reason']}")
    if len(f.get("corrupt", [])) > MAX_LISTED:
        w.append(f"... and {len(f['corrupt']) - MAX_LISTED} more corrupt files")
    if f.get("tiny"):
        t = f["tiny"]
        w.append(f"{len(t)} tiny image(s) (shorter side under {f['tiny_side']} px), e.g. "
                 + ", ".join(f"{_rel(x['path'], root)} ({x['width']}x{x['height']})" for x in t[:3]))
    near = f.get("near_duplicates", [])
    ncross = [d for d in near if d["cross_class"]]
    for d in ncross[:MAX_LISTED]:
        w.append(f"near-duplicate photos in classes {' and '.join(d['classes'])} (distance "
                 f"{d['distance']}): {_examples(d['paths'], root)}")
    if f.get("near_truncated"):
        w.append(f"over {MAX_PAIRS:,} near-duplicate pairs: the search stopped early (many near-identical "
                 "images, e.g. blank frames?); try a smaller --max-distance")
    li = f.get("label_issues") or {}
    if li.get("suspects"):
        w.append(f"{len(li['suspects'])} photo(s) may be mislabelled (their folder disagrees with out-of-fold "
                 f"predictions), e.g. {_examples([s['path'] for s in li['suspects']], root)}; see the label check")
    if len(near) - len(ncross):
        w.append(f"{len(near) - len(ncross)} group(s) of near-duplicate photos within a class "
                 "(resized/re-encoded copies; they may leak between train and test)")
    return w


def quick_check(s) -> list[str]:
    """The cheap checks on a scan (no decoding): warnings for `fit` to print and store."""
    return _warnings(_cheap_findings(s))


# ------------------------------------------------------------------------------- full check

def _inspect(path: str):
    """(width, height, phash as uint64) of one image, or an error reason. Decodes small (draft)."""
    import imagehash
    from PIL import Image

    from retrain.errors import ImageError
    from retrain.images import open_image

    try:
        im = open_image(path, draft_size=64)  # raises ImageError with the reason
        with Image.open(path) as raw:  # the true size, before draft scaling
            w, h = raw.size
        if w != h and (im.width > im.height) != (w > h):  # EXIF rotation by 90 degrees
            w, h = h, w
        hv = imagehash.phash(im, hash_size=8)
        bits = np.packbits(hv.hash.ravel().astype(np.uint8))
        return w, h, int.from_bytes(bits.tobytes(), "big"), None
    except ImageError as e:
        reason = str(e)
        prefix = f"{path}: "
        return None, None, None, reason[len(prefix):] if reason.startswith(prefix) else reason
    except Exception as e:  # Pillow raises many types on broken files; all mean "cannot read"
        return None, None, None, f"{type(e).__name__}: {e}"


def _popcount(x: np.ndarray) -> np.ndarray:
    """Set bits per uint64 (numpy >= 2 has it built in)."""
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(x)
    return np.unpackbits(x[..., None].view(np.uint8), axis=-1).sum(-1, dtype=np.uint8)


def _near_groups(paths, hashes, digests, labels, max_distance):
    """Groups of images whose pHashes differ in at most `max_distance` bits (not exact copies)."""
    n = len(paths)
    if n < 2:
        return [], False
    h = np.array(hashes, dtype=np.uint64)
    parent = list(range(n))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    pair_dist = []  # (i, j, distance) for i < j, different bytes
    truncated = False
    chunk = max(1, 4_000_000 // n)  # bound memory: chunk x n distances at a time
    for s0 in range(0, n, chunk):
        block = h[s0:s0 + chunk]
        d = _popcount(block[:, None] ^ h[None, :])  # (chunk, n) Hamming distances
        rows = np.arange(s0, s0 + len(block))[:, None]
        ii, jj = np.nonzero((d <= max_distance) & (np.arange(n)[None, :] > rows))
        for i, j in zip(ii + s0, jj):
            if digests[i] != digests[j]:
                pair_dist.append((int(i), int(j), int(d[i - s0, j])))
        if len(pair_dist) > MAX_PAIRS:  # e.g. thousands of near-blank frames: stop, say so
            truncated = True
            break
    for i, j, _ in pair_dist:
        ri, rj = find(i), find(j)
        if ri != rj:
            parent[ri] = rj
    widest = defaultdict(int)  # group root -> largest distance inside it
    for i, j, dist in pair_dist:
        r = find(i)
        widest[r] = max(widest[r], dist)
    groups = defaultdict(list)
    for i in range(n):
        groups[find(i)].append(i)
    out = []
    for root, members in groups.items():
        if len(members) < 2 or len({digests[i] for i in members}) < 2:
            continue
        dist = widest[root]
        classes = sorted({labels[i] for i in members})
        out.append({"paths": sorted(paths[i] for i in members), "classes": classes,
                    "cross_class": len(classes) > 1, "distance": dist})
    return sorted(out, key=lambda g: (not g["cross_class"], g["paths"][0])), truncated


def check(image_dir, *, near: bool = True, max_distance: int = NEAR_DISTANCE, tiny_side: int = TINY_SIDE,
          workers: int = 0, quiet: bool = False, labels: dict | None = None) -> dict:
    """Full check of an image folder: the cheap findings plus decoding every image. JSON-ready.

    `labels`: also look for mislabelled photos (f["label_issues"]), with these keyword
    arguments of label_issues ({} for the defaults)."""
    import time
    from concurrent.futures import ThreadPoolExecutor

    from retrain.errors import MissingDependency
    from retrain.progress import bar
    from retrain.scan import scan

    try:
        import imagehash  # noqa: F401
    except ImportError:
        raise MissingDependency("retrain check needs the imagehash package: pip install 'imagehash>=4.3'") from None
    t0 = time.perf_counter()
    s = scan(image_dir, quiet=quiet)
    f = _cheap_findings(s)
    f["tiny_side"] = tiny_side
    workers = workers or min(4, os.cpu_count() or 1)
    paths = [it.path for it in s.items]
    with ThreadPoolExecutor(workers) as ex:  # Pillow decodes without the GIL
        results = list(bar(ex.map(_inspect, paths), total=len(paths), desc="Checking", unit="img", quiet=quiet))
    corrupt, tiny, ok = [], [], []
    for it, (w, h, ph, err) in zip(s.items, results):
        if err:
            corrupt.append({"path": it.path, "reason": err})
            continue
        if min(w, h) < tiny_side:
            tiny.append({"path": it.path, "width": w, "height": h})
        ok.append((it, ph))
    f["corrupt"] = corrupt
    f["tiny"] = tiny
    if near:
        f["near_duplicates"], f["near_truncated"] = _near_groups([it.path for it, _ in ok], [ph for _, ph in ok],
                                            [it.digest for it, _ in ok], [it.label for it, _ in ok],
                                            max_distance)
        f["near_distance"] = max_distance
    if labels is not None:
        bad = {c["path"] for c in corrupt}
        f["label_issues"] = label_issues(s, exclude=bad, quiet=quiet, **labels)
    f["seconds"] = round(time.perf_counter() - t0, 3)
    f["warnings"] = _warnings(f)
    return f


def label_issues(s, *, architecture: str | None = None, cache_dir=None, precision: str = "auto",
                 provider: str = "auto", folds: int | None = None, l2: float | None = None, seed: int = 0,
                 exclude=(), quiet: bool = False, log=None) -> dict:
    """Mislabelled-photo suspects of a scan (retrain.mislabels.find_label_issues) on the
    bottlenecks, read from the cache that `retrain fit` fills (computed now where missing)."""
    from retrain import mislabels
    from retrain.architectures import get_backbone
    from retrain.bottlenecks import choose_precision, extract
    from retrain.cache import BottleneckCache, default_cache_dir
    from retrain.config import FitConfig

    mislabels.require()  # a missing package is said before any bottleneck is computed
    bb = get_backbone(architecture or FitConfig.architecture)  # the backbone (and cache) fit uses by default
    cache = BottleneckCache(cache_dir or default_cache_dir(), bb, precision=choose_precision(precision,
                            provider=provider), log=log)
    exclude = set(exclude)
    items = [it for it in s.items if it.path not in exclude]
    feats, failures, timing = extract(items, bb, cache, provider=provider, quiet=quiet, log=log)
    keep = [i for i, it in enumerate(items) if it.path not in failures]
    present = {items[i].label for i in keep}
    classes = [c for c in s.classes if c in present]
    if len(classes) < 2:
        return {"skipped": "fewer than 2 classes with readable photos: nothing to compare labels with"}
    y = [classes.index(items[i].label) for i in keep]
    r = mislabels.find_label_issues(feats[keep], y, [items[i].path for i in keep], classes,
                                    folds=folds or mislabels.FOLDS, l2=l2, seed=seed, log=log)
    return r | {"architecture": bb.name, "bottleneck_precision": cache.precision, "bottlenecks": timing}


def format_label_issues(li: dict, root: str, limit: int = MAX_LISTED) -> list[str]:
    """The label check's lines for people."""
    if li.get("skipped"):
        return ["", f"label check skipped: {li['skipped']}"]
    sus = li["suspects"]
    lines = ["", f"label check: {len(sus)} of {li['n']} photos may be mislabelled ({li['folds']}-fold out-of-fold "
             f"predictions at L2 {li['l2']:g}, {li['out_of_fold_accuracy']:.1%} agree with their folder; "
             f"confident learning; {li['seconds']:.1f} s)"]
    if not sus:
        return lines + ["  none found"]
    w = max(len(f"{s['label']} -> {s['suggested']}") for s in sus[:limit])
    lines.append(f"  {'score':>5}  {'folder -> looks like':<{w}}  photo")
    for s in sus[:limit]:
        lines.append(f"  {s['score']:5.3f}  {s['label'] + ' -> ' + s['suggested']:<{w}}  {_rel(s['path'], root)}")
    if len(sus) > limit:
        lines.append(f"  ... and {len(sus) - limit} more (--json lists all)")
    pairs = li.get("confused_pairs") or []
    if pairs:
        lines.append("most confused: " + ", ".join(f"{p['labelled']} -> {p['looks_like']} {p['count']}"
                                                   for p in pairs[:5]))
    lines.append("'looks like' is the closest class; a photo of none of them belongs elsewhere. To look at them "
                 f"apart: retrain check {root} --labels --move-to REVIEW/")
    return lines


def format_check(f: dict) -> str:
    """The human-readable report."""
    root = f["root"]
    lines = [f"{root}: {f['total']} images in {len(f['classes'])} classes"]
    w = max([5] + [len(c) for c in f["classes"]])
    top = max(f["classes"].values() or [1]) or 1
    for c, n in f["classes"].items():
        lines.append(f"  {c:<{w}}  {n:6d}  {'#' * max(0, round(30 * n / top))}")
    im = f.get("imbalance")
    if im:
        lines.append(f"  imbalance: largest/smallest = {im['ratio']:g}")
    lines.append(f"corrupt or skipped: {len(f.get('corrupt', [])) + len(f['unreadable'])}, "
                 f"tiny: {len(f.get('tiny', []))}, exact duplicate groups: {len(f['exact_duplicates'])}, "
                 f"near-duplicate groups: {len(f.get('near_duplicates', []))}, "
                 f"non-image files: {len(f['non_image_files'])}, stray: {len(f['stray'])}, "
                 f"name collisions: {len(f['name_collisions'])}")
    ws = f.get("warnings") or _warnings(f)
    if ws:
        lines.append("")
        lines += [f"warning: {x}" for x in ws]
    else:
        lines.append("no problems found")
    if f.get("near_duplicates"):
        lines.append("")
        lines.append(f"near duplicates (pHash distance <= {f.get('near_distance')}):")
        for g in f["near_duplicates"][:MAX_LISTED]:
            lines.append("  " + "  ".join(_rel(p, root) for p in g["paths"])
                         + (f"   [{' / '.join(g['classes'])}]" if g["cross_class"] else ""))
        if len(f["near_duplicates"]) > MAX_LISTED:
            lines.append(f"  ... and {len(f['near_duplicates']) - MAX_LISTED} more groups (--json lists all)")
    if f.get("label_issues"):
        lines += format_label_issues(f["label_issues"], root)
    return "\n".join(lines)


def problem_count(f: dict) -> int:
    return len(f.get("warnings") or _warnings(f))


def add_arguments(p) -> None:
    from retrain.config import FitConfig, bounded
    from retrain.mislabels import FOLDS, L2, MAX_MOVES

    p.add_argument("image_dir", nargs="?", help="folder with one subfolder of photos per class")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--no-near", dest="near", action="store_false",
                   help="skip the near-duplicate search (perceptual hashes)")
    p.add_argument("--max-distance", type=int, default=NEAR_DISTANCE,
                   help=f"pHash bits (of 64) that may differ for a near duplicate (default {NEAR_DISTANCE})")
    p.add_argument("--min-size", type=int, default=TINY_SIDE,
                   help=f"shorter side in pixels below which an image counts as tiny (default {TINY_SIDE})")
    p.add_argument("--workers", type=bounded(int, 0, 256, "--workers"), default=0, help="decoding threads (0: one per core, at most 4)")
    p.add_argument("--strict", action="store_true", help="exit with status 1 when anything is flagged")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    g = p.add_argument_group("mislabelled photos (needs cleanlab: pip install 'retrain[labels]')")
    g.add_argument("--labels", action="store_true",
                   help="rank the photos whose folder disagrees most with out-of-fold predictions of the "
                        "cached bottlenecks (confident learning), with the label they look like")
    g.add_argument("--move-to", metavar="REVIEW", help="with --labels: move the suspects into REVIEW/<their path "
                   "in the image folder> and write REVIEW/manifest.json (nothing is deleted or overwritten)")
    g.add_argument("--max-moves", type=bounded(int, 1, 10_000_000, "--max-moves"), default=MAX_MOVES,
                   help=f"suspects moved by --move-to, most suspect first (default {MAX_MOVES})")
    g.add_argument("--min-score", type=bounded(float, 0, 1, "--min-score"), default=None,
                   help="move only suspects with at least this score (0-1)")
    g.add_argument("--undo", metavar="MANIFEST", help="move the photos listed in REVIEW/manifest.json back")
    g.add_argument("--folds", type=bounded(int, 2, 20, "--folds"), default=None,
                   help=f"folds of the out-of-fold predictions (default {FOLDS}, fewer for small classes)")
    g.add_argument("--l2", type=bounded(float, 1e-8, 1e4, "--l2"), default=None,
                   help=f"L2 strength of the out-of-fold heads (default {L2:g})")
    g.add_argument("--architecture", default=FitConfig.architecture,
                   help=f"backbone whose bottlenecks are used (default {FitConfig.architecture}, as retrain fit)")
    g.add_argument("--cache-dir", "--bottleneck_dir", dest="cache_dir", default=None,
                   help="bottleneck cache folder (default: the one retrain fit uses)")
    g.add_argument("--bottleneck-precision", default="auto", choices=("auto", "fp32", "bf16", "int8"),
                   help="bottleneck precision, as for retrain fit (auto: the one fit picks here)")


def _undo(args) -> int:
    from retrain.mislabels import undo_moves
    from retrain.progress import print_json

    r = undo_moves(args.undo)
    if args.json:
        print_json(r)
    else:
        gone = (f"; {len(r['missing'])} were no longer in the review folder: "
                f"{_examples(r['missing'], os.path.dirname(r['manifest']))}") if r["missing"] else ""
        print(f"moved {r['restored']} photo(s) back (manifest {r['manifest']}){gone}")
    return 0


def main(args) -> int:
    from retrain.progress import print_json

    from retrain.errors import ConfigError

    if not 0 <= args.max_distance <= 64:
        raise ConfigError(f"--max-distance must be between 0 and 64 bits, got {args.max_distance}")
    if args.min_size < 0:
        raise ConfigError(f"--min-size must be >= 0, got {args.min_size}")
    if args.workers < 0:
        raise ConfigError(f"--workers must be >= 0, got {args.workers}")
    if args.undo:
        if args.image_dir or args.move_to or args.labels:
            raise ConfigError("--undo MANIFEST moves photos back and does nothing else: give it alone "
                              "(retrain check --undo REVIEW/manifest.json)")
        return _undo(args)
    if not args.image_dir:
        raise ConfigError("no image folder given: retrain check IMAGE_DIR (or --undo REVIEW/manifest.json)")
    if args.move_to and not args.labels:
        raise ConfigError("--move-to moves the photos that --labels finds: add --labels")
    labels = None
    if args.labels:
        from retrain.architectures import get_backbone
        from retrain.bottlenecks import choose_precision
        from retrain.mislabels import check_review_folder, require

        require()  # all said before any work
        get_backbone(args.architecture)
        choose_precision(args.bottleneck_precision)
        if args.move_to:
            check_review_folder(args.image_dir, args.move_to)  # refused before any work
        labels = {"architecture": args.architecture, "cache_dir": args.cache_dir,
                  "precision": args.bottleneck_precision, "folds": args.folds, "l2": args.l2}
    f = check(args.image_dir, near=args.near, max_distance=args.max_distance, tiny_side=args.min_size,
              workers=args.workers, quiet=args.quiet or args.json, labels=labels)
    if args.move_to and not (f["label_issues"].get("skipped")):
        from retrain.mislabels import move_suspects

        f["moved"] = move_suspects(f["label_issues"]["suspects"], f["root"], args.move_to,
                                   max_moves=args.max_moves, min_score=args.min_score)
    if args.json:
        print_json(f)
    else:
        print(format_check(f))
        if f.get("moved"):
            m = f["moved"]
            print(f"moved {len(m['moves'])} photo(s) to {m['review']} (their paths kept); look at them, put back "
                  f"the ones that were right, move the others to their class; undo all: {m['undo']}")
    return 1 if args.strict and problem_count(f) else 0
