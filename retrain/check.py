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

The scan-only findings and the warning lines are retrain.findings; decoding and the
near-duplicate search are retrain.near_duplicates; the command and the label check are here.
"""

from __future__ import annotations

import os

from retrain.findings import MAX_LISTED, examples, rel, scan_findings, warning_lines
from retrain.near_duplicates import inspect_image, near_groups

# Thresholds of the full check (each is a flag of `retrain check` too).
TINY_SIDE = 64  # shorter side below this many pixels: upscaled a lot to the backbone's input
NEAR_DISTANCE = 6  # pHash Hamming distance (of 64 bits) at or below which two images look alike


def quick_check(s) -> list[str]:
    """The cheap checks on a scan (no decoding): warnings for `fit` to print and store."""
    return warning_lines(scan_findings(s))


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
    f = scan_findings(s)
    f["tiny_side"] = tiny_side
    workers = workers or min(4, os.cpu_count() or 1)
    paths = [it.path for it in s.items]
    with ThreadPoolExecutor(workers) as ex:  # Pillow decodes without the GIL
        results = list(bar(ex.map(inspect_image, paths), total=len(paths), desc="Checking", unit="img", quiet=quiet))
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
        f["near_duplicates"], f["near_truncated"] = near_groups(
            [it.path for it, _ in ok], [ph for _, ph in ok], [it.digest for it, _ in ok],
            [it.label for it, _ in ok], max_distance)
        f["near_distance"] = max_distance
    if labels is not None:
        bad = {c["path"] for c in corrupt}
        f["label_issues"] = label_issues(s, exclude=bad, quiet=quiet, **labels)
    f["seconds"] = round(time.perf_counter() - t0, 3)
    f["warnings"] = warning_lines(f)
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
        lines.append(f"  {s['score']:5.3f}  {s['label'] + ' -> ' + s['suggested']:<{w}}  {rel(s['path'], root)}")
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
    ws = f.get("warnings") or warning_lines(f)
    if ws:
        lines.append("")
        lines += [f"warning: {x}" for x in ws]
    else:
        lines.append("no problems found")
    if f.get("near_duplicates"):
        lines.append("")
        lines.append(f"near duplicates (pHash distance <= {f.get('near_distance')}):")
        for g in f["near_duplicates"][:MAX_LISTED]:
            lines.append("  " + "  ".join(rel(p, root) for p in g["paths"])
                         + (f"   [{' / '.join(g['classes'])}]" if g["cross_class"] else ""))
        if len(f["near_duplicates"]) > MAX_LISTED:
            lines.append(f"  ... and {len(f['near_duplicates']) - MAX_LISTED} more groups (--json lists all)")
    if f.get("label_issues"):
        lines += format_label_issues(f["label_issues"], root)
    return "\n".join(lines)


def problem_count(f: dict) -> int:
    return len(f.get("warnings") or warning_lines(f))


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
                f"{examples(r['missing'], os.path.dirname(r['manifest']))}") if r["missing"] else ""
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
