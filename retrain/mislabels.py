"""Photos whose folder label the rest of the folder disagrees with: confident learning on
out-of-fold predictions of the cached bottlenecks.

1. Out-of-fold probabilities: the photos are dealt into stratified folds; a softmax head
   (retrain.head, L-BFGS at one fixed L2) trained on the other folds predicts each fold, so no
   photo is judged by a head that saw its own label. On cached bottlenecks this takes seconds.
2. Confident learning (Northcutt, Jiang & Chuang, "Confident Learning: Estimating Uncertainty
   in Dataset Labels", JAIR 70, 2021): each class j gets a threshold t_j, the mean predicted
   probability of j over the photos labelled j; a photo labelled i counts as "confidently j"
   when p_j >= t_j (the largest such j). These counts form the confident joint C[i][j], the
   estimated number of photos labelled i that are really j, and for each pair i != j the
   C[i][j] photos labelled i with the largest margin p_j - p_i are flagged (prune by noise rate).
   cleanlab, the reference implementation, does this step (optional extra `retrain[labels]`,
   imported only here and only when asked).
3. The flagged photos are ranked by a label-quality score (RANK_BY): the least likely given
   label first. `score` = 1 - quality: 0 means the head agrees with the folder, 1 that it is
   certain the folder is wrong.

`find_label_issues(features, labels, paths, classes)` returns the ranked suspects and the class
pairs most confused; `move_suspects` / `undo_moves` act on them (a move never deletes or
overwrites anything, and its manifest moves every photo back).
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from pathlib import Path

import numpy as np

from retrain.errors import ConfigError, DataError, MissingDependency

FOLDS = 5  # stratified folds of the out-of-fold predictions
MIN_PER_FOLD = 2  # photos of every class in each held-out fold (fewer folds when a class is small)
L2 = 1e-2  # L2 strength of the out-of-fold heads when no chosen one is given (BENCHMARKS.md)
MAX_ITER = 200  # L-BFGS iterations per fold: out-of-fold ranking does not need full convergence
RANK_BY = "self_confidence"  # cleanlab.rank method: score = 1 - p(given label)
MAX_MOVES = 50  # suspects moved by --move-to unless told otherwise
TOP_PROBS = 5  # classes kept in each suspect's "probs"
MANIFEST = "manifest.json"
MANIFEST_KIND = "retrain label review"
INSTALL = "pip install 'retrain[labels]' (or: pip install 'cleanlab==2.9.*')"


def require():
    """The cleanlab module, or MissingDependency saying what to install."""
    try:
        import cleanlab.filter
        import cleanlab.rank
    except ImportError:
        raise MissingDependency(f"finding mislabelled photos needs the cleanlab package: {INSTALL}") from None
    return cleanlab


def available() -> bool:
    """Whether cleanlab can be imported (without importing it)."""
    import importlib.util

    return importlib.util.find_spec("cleanlab") is not None


def folds_for(y: np.ndarray, k: int, folds: int = FOLDS) -> int:
    """How many folds the smallest class allows (at least MIN_PER_FOLD of it in each); 0: too few."""
    smallest = int(np.bincount(y, minlength=k).min()) if len(y) else 0
    f = min(folds, smallest // MIN_PER_FOLD)
    return f if f >= 2 else 0


def out_of_fold_probs(X: np.ndarray, y: np.ndarray, k: int, *, folds: int = FOLDS, l2: float = L2,
                      seed: int = 0, max_iter: int = MAX_ITER) -> np.ndarray:
    """(n, k) probabilities of each photo from a head trained on the folds it is not in."""
    from retrain.head import cross_validate, softmax

    cv = cross_validate(np.asarray(X, np.float32), np.asarray(y), k, folds=folds, l2=l2, seed=seed,
                        max_iter=max_iter)
    return softmax(cv["logits"])


def rank_issues(y: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(flagged, score): the boolean mask of confident learning's label issues (prune by noise
    rate) and every photo's score, 1 - its label quality (higher: more likely mislabelled)."""
    cl = require()
    y = np.asarray(y, np.int64)
    probs = np.asarray(probs, np.float64)
    flagged = cl.filter.find_label_issues(y, probs, filter_by="prune_by_noise_rate", n_jobs=1)
    quality = cl.rank.get_label_quality_scores(y, probs, method=RANK_BY)
    return np.asarray(flagged, bool), 1.0 - np.asarray(quality, np.float64)


def find_label_issues(features, labels, paths, classes, *, folds: int = FOLDS, l2: float | None = None,
                      seed: int = 0, probs: np.ndarray | None = None, log=None) -> dict:
    """The photos whose label most disagrees with out-of-fold predictions. JSON-ready:

    {"suspects": [{"path", "label", "suggested", "score", "probs": {class: p}}] (most suspect first),
     "confused_pairs": [{"labelled", "looks_like", "count"}] (pairs of the suspects, most first),
     "n", "folds", "l2", "method", "seconds"}; or {"skipped": why} when a class is too small to fold.
    `labels`: class index of each photo; `probs`: out-of-fold probabilities already computed.
    """
    from retrain.progress import Log

    log = log or Log.silent()
    t0 = time.perf_counter()
    y = np.asarray(labels, np.int64)
    k = len(classes)
    given = probs if probs is not None else features
    if len(y) != len(paths) or len(y) != len(given):
        raise DataError(f"{len(paths)} paths, {len(y)} labels and {len(given)} rows of "
                        f"{'probabilities' if probs is not None else 'features'}: they must match")
    require()  # a missing package is said before any work
    if k < 2:
        return {"skipped": "fewer than 2 classes: nothing to compare labels with"}
    if probs is None:
        folds = folds_for(y, k, folds)
        if not folds:
            counts = np.bincount(y, minlength=k)
            c = int(np.argmin(counts))
            return {"skipped": f"class '{classes[c]}' has {int(counts[c])} photos; the out-of-fold check needs "
                               f"at least {2 * MIN_PER_FOLD} per class"}
        l2 = L2 if l2 is None else float(l2)
        log(f"Label check: {folds}-fold out-of-fold predictions (L2 {l2:g}) of {len(y)} photos")
        probs = out_of_fold_probs(features, y, k, folds=folds, l2=l2, seed=seed)
    else:
        folds, l2 = None, None  # made by the caller
    flagged, score = rank_issues(y, probs)
    idx = np.nonzero(flagged)[0]
    idx = idx[np.argsort(-score[idx], kind="stable")]
    suspects = []
    for i in idx:
        p = probs[i]
        other = p.copy()
        other[y[i]] = -1
        top = np.argsort(-p, kind="stable")[:TOP_PROBS]
        suspects.append({"path": str(paths[i]), "label": classes[y[i]], "suggested": classes[int(other.argmax())],
                         "score": round(float(score[i]), 4),
                         "probs": {classes[j]: round(float(p[j]), 4) for j in top}})
    pairs = Counter((s["label"], s["suggested"]) for s in suspects)
    confused = [{"labelled": a, "looks_like": b, "count": n}
                for (a, b), n in sorted(pairs.items(), key=lambda kv: (-kv[1], kv[0]))]
    oof_acc = float((probs.argmax(1) == y).mean()) if len(y) else float("nan")
    return {"suspects": suspects, "confused_pairs": confused, "n": len(y), "folds": folds, "l2": l2,
            "out_of_fold_accuracy": round(oof_acc, 4),
            "method": f"confident learning (cleanlab prune_by_noise_rate), ranked by {RANK_BY}",
            "seconds": round(time.perf_counter() - t0, 3)}


# ------------------------------------------------------------------------------ acting on them

def _inside(path: Path, folder: Path) -> bool:
    try:
        path.relative_to(folder)
        return True
    except ValueError:
        return False


def check_review_folder(image_dir, review) -> Path:
    """The review folder (absolute), or a ConfigError: inside the image folder it would be
    scanned as photos; a file is not a folder; a manifest there means an earlier move."""
    root = Path(os.path.realpath(Path(image_dir).expanduser()))
    given = Path(review).expanduser()
    real = Path(os.path.realpath(given))
    if _inside(real, root):
        raise ConfigError(f"--move-to {given} is inside the image folder {root}, where it would be scanned as "
                          "photos; give a folder outside it, e.g. --move-to review/")
    if real.exists() and not real.is_dir():
        raise ConfigError(f"--move-to {given} is a file; give a folder")
    if (real / MANIFEST).exists():
        raise ConfigError(f"{real / MANIFEST} already exists (an earlier move): undo it with retrain check --undo "
                          f"{real / MANIFEST}, or give another --move-to folder")
    return real


def move_suspects(suspects: list[dict], image_dir, review, *, max_moves: int = MAX_MOVES,
                  min_score: float | None = None) -> dict:
    """Move the first `max_moves` suspects (those with score >= `min_score`, if given) from
    `image_dir` to `review`/<their path relative to image_dir>, and write `review`/manifest.json
    listing every move. Nothing is deleted or overwritten: a destination that exists, a manifest
    already there, or `review` inside `image_dir` (it would be scanned as a class) is refused
    before anything moves. Returns the manifest, with its "manifest" path."""
    from retrain.files import write_json_atomic

    root = Path(os.path.realpath(Path(image_dir).expanduser()))
    review = check_review_folder(root, review)
    manifest = review / MANIFEST
    chosen = [s for s in suspects if min_score is None or s["score"] >= min_score][:max_moves]
    moves = []
    for s in chosen:
        src = Path(os.path.realpath(s["path"]))
        if not _inside(src, root):
            raise DataError(f"{src} is not inside {root}; nothing was moved")
        dst = review / src.relative_to(root)
        if dst.exists() or dst.is_symlink():
            raise ConfigError(f"{dst} already exists; nothing was moved (retrain never overwrites a file): "
                              "give another --move-to folder")
        if not src.is_file():
            raise DataError(f"{src} is no longer there; nothing was moved (run the check again)")
        moves.append({"from": str(src), "to": str(dst), "label": s["label"], "suggested": s["suggested"],
                      "score": s["score"]})
    doc = {"kind": MANIFEST_KIND, "image_dir": str(root), "review": str(review),
           "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "moves": moves, "complete": False,
           "undo": f"retrain check --undo {manifest}"}
    review.mkdir(parents=True, exist_ok=True)
    # The manifest first, listing every planned move: whatever stops the moves, undo finds each
    # photo that did move (it moves back the ones found in the review folder).
    write_json_atomic(manifest, doc)
    for m in moves:
        Path(m["to"]).parent.mkdir(parents=True, exist_ok=True)
        _move(Path(m["from"]), Path(m["to"]))
    doc["complete"] = True
    write_json_atomic(manifest, doc)
    return doc | {"manifest": str(manifest)}


def _move(src: Path, dst: Path) -> None:
    """Move src to dst, never replacing an existing dst: a hard link (which fails on an existing
    name) then removing src; across file systems, an exclusive copy then removing src."""
    try:
        os.link(src, dst)
    except FileExistsError:
        raise ConfigError(f"{dst} already exists; it was not overwritten") from None
    except OSError:  # another file system, or links not allowed here: copy
        import shutil

        try:
            with open(src, "rb") as fi, open(dst, "xb") as fo:  # "x": refuse an existing dst
                shutil.copyfileobj(fi, fo)
            shutil.copystat(src, dst)
        except FileExistsError:
            raise ConfigError(f"{dst} already exists; it was not overwritten") from None
        except BaseException:
            dst.unlink(missing_ok=True)  # our partial copy, never another file (the "x" open made it)
            raise
    try:
        os.unlink(src)
    except OSError:
        dst.unlink()  # the copy or link made just now: the photo stays where it was
        raise


def undo_moves(manifest) -> dict:
    """Move every photo listed in a manifest written by move_suspects back where it was; refuses
    (before moving anything) where the original name is taken again. The manifest is kept,
    marked undone. Returns {"restored": n, "manifest": path}."""
    from retrain.files import write_json_atomic

    manifest = Path(manifest).expanduser()
    if manifest.is_dir():
        manifest = manifest / MANIFEST
    try:
        doc = json.loads(manifest.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{manifest} not found: give the manifest.json that retrain check --move-to wrote") from None
    except (OSError, ValueError) as e:
        raise ConfigError(f"{manifest}: cannot read it as a retrain move manifest ({e})") from None
    moves = doc.get("moves") if isinstance(doc, dict) and doc.get("kind") == MANIFEST_KIND else None
    if not isinstance(moves, list) or not all(isinstance(m, dict) and isinstance(m.get("from"), str)
                                              and isinstance(m.get("to"), str) for m in moves):
        raise ConfigError(f"{manifest} is not a manifest written by retrain check --move-to")
    if doc.get("undone"):
        raise ConfigError(f"{manifest} was already undone on {doc['undone']}; nothing to move back")
    todo = [m for m in moves if Path(m["to"]).exists()]
    gone = [m for m in moves if not Path(m["to"]).exists()]
    for m in list(todo):
        if Path(m["from"]).exists():
            if os.path.samefile(m["from"], m["to"]):  # a move stopped between its link and its unlink
                todo.remove(m)
                continue
            raise ConfigError(f"{m['from']} exists again; nothing was moved back (move it away first)")
    for m in moves:
        if Path(m["from"]).exists() and Path(m["to"]).exists() and os.path.samefile(m["from"], m["to"]):
            os.unlink(m["to"])  # the second name of a photo that never left: ours, made by _move
    for m in todo:
        Path(m["from"]).parent.mkdir(parents=True, exist_ok=True)
        _move(Path(m["to"]), Path(m["from"]))
    write_json_atomic(manifest, doc | {"undone": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                       "not_found_at_undo": [m["to"] for m in gone]})
    return {"restored": len(todo), "missing": [m["to"] for m in gone], "manifest": str(manifest)}


def for_run(X, y, paths, classes, *, l2=None, seed: int = 0, log=None) -> dict:
    """report["label_issues"] of a fit: find_label_issues at the run's chosen L2, or a
    {"skipped": why} note (cleanlab not installed, a class too small to fold) that the report shows."""
    if not available():
        return {"skipped": f"not checked: finding mislabelled photos needs cleanlab: {INSTALL}"}
    try:
        return find_label_issues(X, y, paths, classes, l2=l2 if l2 else None, seed=seed, log=log)
    except MissingDependency as e:
        return {"skipped": f"not checked: {e}"}
