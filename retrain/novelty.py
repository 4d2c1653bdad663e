"""Open-set rejection: how unlike the training photos a photo is (its novelty), and the threshold
above which retrain answers "unknown".

A softmax score only says which class a photo is most like, never that it is none of them, so
the novelty is computed from the backbone's features instead:

    novelty(x) = 1 - max over training photos r of cos(t(x), t(r)),  t(v) = sign(v) sqrt(|v|)

the cosine distance to the nearest training photo (k-nearest neighbours, k = 1) on the signed
square roots of the features. Chosen by measurement (benchmarks/bench_novelty.py, BENCHMARKS.md):
on the flowers, holding each class out in turn, it separated the unseen class best among
Mahalanobis distance to the class means (shared covariance, Ledoit-Wolf shrinkage, raw or
L2-normalised features), k-NN on raw features (k = 1, 10) and the softmax's top score.

The references are the training and validation photos (never the test split), at most
REFERENCES_MAX of them, stored in float16 in the model. The threshold keeps a share (the
coverage, default 95%) of in-distribution photos: each reference photo is scored leave-one-out
(its own file and exact duplicates set aside), and the threshold is the split-conformal
quantile of those scores, the ceil((n + 1) coverage)-th smallest, so an unseen photo like them
is accepted with probability at least the coverage; with too few photos for that (19 at 95%)
no threshold is set. Photos known to be none of the classes (`fit --unknown-examples`) can only
tighten it: it moves down to where accepted references + rejected examples is highest, keeping
at least coverage - 5 points of the references.

`onnx_nodes` builds the same computation as ONNX nodes on the features tensor, so model.onnx
has a second output `novelty` (N,) that any ONNX Runtime client gets. numpy and onnx only.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import numpy as np

from retrain.errors import ConfigError, DataError

METHOD = "knn-cosine-sqrt"
DESCRIPTION = ("1 - cosine similarity to the nearest training photo (k-nearest neighbours, k=1) on the "
               "signed square roots of the backbone's features; above the threshold: unknown")
OUTPUT = "novelty"  # the model's second output
COVERAGE = 0.95
REFERENCES_MAX = 8192  # photos kept as references (float16: 2.6 KB each for 1280 features)
CHUNK = 1024  # queries per similarity block
HIST_BINS = 30
TIGHTEN_MAX_LOSS = 0.05  # --unknown-examples may cost at most this share of in-distribution photos


# ------------------------------------------------------------------------------ the score

def transform(X) -> np.ndarray:
    """Features (n, C) -> signed square roots, unit length (float32). An all-zero row stays zero."""
    X = np.asarray(X, np.float32)
    T = np.sign(X) * np.sqrt(np.abs(X))
    n = np.sqrt((T * T).sum(1, keepdims=True))
    return T / np.maximum(n, np.float32(1e-12))


@dataclass
class Novelty:
    """The fitted score: unit-length transformed reference features and the threshold."""

    references: np.ndarray  # (M, C) float16, transform() of the reference photos' features
    ref_labels: np.ndarray  # (M,) class index of each reference
    threshold: float | None  # novelty above this: unknown (None: never)
    coverage: float
    report: dict = field(default_factory=dict)  # what report.json["novelty"] says

    method = METHOD

    def score(self, X) -> np.ndarray:
        """Novelty (n,) of features (n, C), as the model's `novelty` output computes it."""
        return 1.0 - self.similarities(X).max(1)

    def similarities(self, X, groups=None, ref_groups=None, by_class: int | None = None) -> np.ndarray:
        """Cosine similarities of transform(X) to the references: (n, M), or with `by_class` K the
        largest per reference class (n, K; -inf where a class has none). `groups` / `ref_groups`
        (ints): a query never matches a reference of its own group (itself, its exact duplicates)."""
        R = self.references.astype(np.float32)
        Q = transform(X)
        out = []
        for s in range(0, len(Q), CHUNK):
            S = Q[s:s + CHUNK] @ R.T
            if groups is not None:
                S[np.asarray(groups[s:s + CHUNK])[:, None] == np.asarray(ref_groups)[None, :]] = -np.inf
            if by_class is None:
                out.append(S)
            else:
                m = np.full((len(S), by_class), -np.inf, np.float32)
                for k in range(by_class):
                    cols = self.ref_labels == k
                    if cols.any():
                        m[:, k] = S[:, cols].max(1)
                out.append(m)
        width = by_class if by_class is not None else len(R)
        return np.concatenate(out) if out else np.zeros((0, width), np.float32)

    def metadata(self) -> dict:
        """The model's metadata keys for it (retrain.model.METADATA)."""
        return {"novelty_output": OUTPUT, "novelty_method": DESCRIPTION,
                "novelty_threshold": None if self.threshold is None else round(float(self.threshold), 6),
                "unknown_coverage": self.coverage}


def conformal_threshold(scores, coverage: float) -> float | None:
    """The ceil((n + 1) * coverage)-th smallest of n in-distribution scores: a new photo like them
    scores at most this with probability >= coverage. None when n is too small for that."""
    s = np.sort(np.asarray(scores, np.float64))
    k = math.ceil((len(s) + 1) * coverage - 1e-9)
    if k < 1 or k > len(s):
        return None
    return float(s[k - 1])


def rejected(scores, threshold) -> float | None:
    """Share of `scores` above `threshold` (answered unknown); None for no scores."""
    s = np.asarray(scores, np.float64)
    if not len(s):
        return None
    return 0.0 if threshold is None else float((s > threshold).mean())


def auroc(inside, outside) -> float | None:
    """Probability that an outside photo scores above an inside one (ties count half)."""
    a, b = np.asarray(inside, np.float64), np.asarray(outside, np.float64)
    if not len(a) or not len(b):
        return None
    from scipy.stats import rankdata

    r = rankdata(np.concatenate([a, b]))
    return float((r[len(a):].sum() - len(b) * (len(b) + 1) / 2) / (len(a) * len(b)))


def tighten(threshold, inside, examples, *, min_kept: float = 0.0) -> tuple[float | None, dict]:
    """Move the threshold down (never up) to where accepted inside + rejected example photos is
    highest (Youden's J), keeping at least `min_kept` of the inside photos; ties keep the higher
    threshold. Returns (threshold, info)."""
    inside, examples = np.asarray(inside, np.float64), np.asarray(examples, np.float64)
    top = math.inf if threshold is None else threshold

    def j(t):
        return float((inside <= t).mean() + (examples > t).mean() - 1)

    cands = np.unique(np.concatenate([inside, examples]))
    cands = [float(t) for t in cands if t <= top and (inside <= t).mean() >= min_kept - 1e-12]
    if threshold is not None:
        cands.append(float(threshold))
    best = threshold
    if cands:
        scored = [(j(t), t) for t in cands]
        jb, tb = max(scored, key=lambda p: (round(p[0], 12), p[1]))
        if threshold is None or jb > j(threshold) + 1e-12:
            best = tb
    info = {"threshold_before": threshold, "threshold": best,
            "examples_rejected_before": rejected(examples, threshold), "examples_rejected": rejected(examples, best),
            "inside_kept_before": None if threshold is None else float((inside <= threshold).mean()),
            "inside_kept": 1.0 if best is None else float((inside <= best).mean())}
    return best, info


def histogram(inside, outside, *, inside_label: str, outside_label: str, threshold=None,
              bins: int = HIST_BINS) -> dict:
    """Counts of both score sets over shared bins (for report.html), JSON-ready."""
    a, b = np.asarray(inside, np.float64), np.asarray(outside, np.float64)
    both = np.concatenate([a, b, [threshold] if threshold is not None else []])
    if not len(both):
        return {}
    lo, hi = float(both.min()), float(both.max())
    if hi <= lo:
        hi = lo + 1e-3
    edges = np.linspace(lo, hi, bins + 1)
    return {"edges": [round(float(e), 6) for e in edges],
            "inside": np.histogram(a, edges)[0].tolist(), "outside": np.histogram(b, edges)[0].tolist(),
            "inside_label": inside_label, "outside_label": outside_label,
            "threshold": None if threshold is None else round(float(threshold), 6)}


# ------------------------------------------------------------------------------ fitting

def choose_references(idx: np.ndarray, y: np.ndarray, limit: int = REFERENCES_MAX, seed: int = 0) -> np.ndarray:
    """`idx` itself, or at most `limit` of it, the same share of each class (seeded)."""
    idx = np.asarray(idx, np.int64)
    if len(idx) <= limit:
        return idx
    rng = np.random.default_rng(seed)
    keep = []
    for k in np.unique(y[idx]):
        mine = idx[y[idx] == k]
        keep.append(rng.choice(mine, max(1, round(limit * len(mine) / len(idx))), replace=False))
    return np.sort(np.concatenate(keep))[:limit]


def fit(X, y, parts: dict, labels: list[str], *, coverage: float = COVERAGE, digests=None,
        examples=None, examples_info=None, seed: int = 0, log=None) -> Novelty:
    """The novelty score of a run: references from the training + validation photos, the
    threshold at `coverage` (leave-one-out, split-conformal), tightened by `examples` (features of
    photos that are none of the classes) if given, and measured:

    - "test": the share of the (never used) test photos it would answer unknown;
    - "held_out_classes": the open-set protocol, each class in turn treated as never seen (its
      photos left out of the references and the threshold) and its photos scored as outside
      photos: AUROC against the other classes' test photos, the share rejected at the coverage.
    `digests`: one string per photo; photos with equal digests (exact duplicates) never match.
    """
    from retrain.progress import Log

    log = log or Log.silent()
    X, y = np.asarray(X, np.float32), np.asarray(y, np.int64)
    K = len(labels)
    trv = np.concatenate([parts.get("train", []), parts.get("validation", [])]).astype(np.int64)
    te = np.asarray(parts.get("test", []), np.int64)
    if not len(trv):
        raise DataError("no training photos to fit the novelty score on")
    refs = choose_references(trv, y, seed=seed)
    groups = np.arange(len(y)) if digests is None else np.unique(np.asarray(digests), return_inverse=True)[1]
    nov = Novelty(transform(X[refs]).astype(np.float16), y[refs], None, coverage)
    # The largest similarity to each class's references, every photo at once (itself left out).
    best = nov.similarities(X, groups, groups[refs], by_class=K)  # (n, K)
    scores = 1.0 - best.max(1)
    inside = scores[trv]  # leave-one-out for references; plain for train photos past the cap
    threshold = conformal_threshold(inside, coverage)
    rep = {"method": METHOD, "description": DESCRIPTION, "output": OUTPUT, "coverage": coverage,
           "references": {"n": len(refs), "of": len(trv), "from": "train + validation",
                          "dtype": "float16", "limit": REFERENCES_MAX},
           "threshold_fitted_on": f"{len(trv)} train + validation photos, each scored leave-one-out "
                                  "(split-conformal quantile)"}
    if threshold is None:
        need = math.ceil(coverage / (1 - coverage)) if coverage < 1 else None
        rep["why_no_threshold"] = (f"{len(trv)} train + validation photos are too few to keep {coverage:.0%} of "
                                   f"in-distribution photos" + (f" (it takes {need})" if need else ""))
    rep["threshold_at_coverage"] = threshold
    if examples is not None and len(examples):
        ex = nov.score(examples)
        threshold, info = tighten(threshold, inside, ex, min_kept=coverage - TIGHTEN_MAX_LOSS)
        rep["examples"] = {**(examples_info or {}), "n": len(ex), **info,
                           "note": "these photos chose the threshold: a measure on them is not a test"}
        log(f"Unknown examples: {len(ex)} photos; {info['examples_rejected_before'] or 0:.1%} rejected at "
            f"{coverage:.0%} coverage -> {info['examples_rejected']:.1%} at the tightened threshold "
            f"(train + validation kept {info['inside_kept']:.1%})")
    nov.threshold = threshold
    rep["threshold"] = threshold
    rep["inside_kept"] = None if threshold is None else float((inside <= threshold).mean())
    rep["test"] = {"n": len(te), "rejected": rejected(scores[te], threshold)}
    rep["held_out_classes"] = held_out_classes(best, y, trv, te, labels, coverage)
    held = [r.pop("_scores") for r in rep["held_out_classes"]["classes"]]
    outside_hist = np.concatenate(held) if held else np.zeros(0)
    rep["histogram"] = histogram(scores[te] if len(te) else inside, outside_hist,
                                 inside_label="test photos" if len(te) else "train + validation (leave-one-out)",
                                 outside_label="photos of a class left out (each in turn)", threshold=threshold)
    nov.report = rep
    if threshold is None:
        log.warn(f"no novelty threshold: {rep['why_no_threshold']}; the model will not answer 'unknown' "
                 "by novelty")
    else:
        h = rep["held_out_classes"]
        log(f"Novelty threshold {threshold:.4f} (keeps {coverage:.0%} of in-distribution photos): test photos "
            f"answered unknown {_share(rep['test']['rejected'])}; a class it never saw (each in turn): "
            f"AUROC {_num(h['mean_auroc'])}, {_share(h['mean_rejected'])} rejected")
    return nov


def held_out_classes(best: np.ndarray, y, trv, te, labels, coverage) -> dict:
    """The open-set protocol from per-class best similarities (n, K): for each class c, the
    references and threshold without c, scored on c's photos (outside) and the others' test
    photos (inside)."""
    K = len(labels)
    rows = []
    for c in range(K):
        others = [k for k in range(K) if k != c]
        if not others:
            continue
        s = 1.0 - best[:, others].max(1)
        ins_fit = trv[y[trv] != c]
        ins_test = te[y[te] != c]
        out = np.nonzero(y == c)[0]
        thr = conformal_threshold(s[ins_fit], coverage)
        rows.append({"class": labels[c], "n_outside": len(out), "n_inside": len(ins_test),
                     "threshold": thr, "auroc": auroc(s[ins_test], s[out]),
                     # no threshold (too few photos without c): nothing to measure at the coverage
                     "rejected": None if thr is None else rejected(s[out], thr),
                     "inside_rejected": None if thr is None else rejected(s[ins_test], thr),
                     "_scores": s[out]})
    def mean(key):
        v = [r[key] for r in rows if r[key] is not None]
        return float(np.mean(v)) if v else None

    return {"protocol": "each class in turn left out of the references and the threshold; its photos are the "
                        "outside photos, the other classes' test photos the inside ones",
            "classes": rows, "mean_auroc": mean("auroc"), "mean_rejected": mean("rejected"),
            "mean_inside_rejected": mean("inside_rejected")}


def _share(v) -> str:
    return "n/a" if v is None else f"{v:.1%}"


def _num(v) -> str:
    return "n/a" if v is None else f"{v:.3f}"


# ------------------------------------------------------------------------------ photos of no class

def list_photos(folder, *, flag: str = "--unknown-examples") -> list[str]:
    """Image files anywhere inside `folder` (sorted; hidden files and folders skipped; links to
    folders not followed). DataError when it is not a folder or holds none."""
    from retrain.images import is_image_name

    root = os.path.abspath(os.path.expanduser(str(folder)))
    if not os.path.isdir(root):
        raise DataError(f"{flag} {folder}: {'not a folder' if os.path.exists(root) else 'folder not found'}; "
                        "give a folder of photos that belong to none of the classes")
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        out += [os.path.join(dirpath, f) for f in sorted(filenames) if not f.startswith(".") and is_image_name(f)]
    if not out:
        raise DataError(f"{flag} {folder}: no images found in it; give a folder of photos that belong to none "
                        "of the classes")
    return out


def check_examples_folder(folder, image_dir) -> None:
    """--unknown-examples must not overlap the image folder (it would be scanned as a class)."""
    ex = os.path.realpath(os.path.expanduser(str(folder)))
    img = os.path.realpath(os.path.expanduser(str(image_dir)))
    if ex == img or ex.startswith(img + os.sep):
        raise ConfigError(f"--unknown-examples {folder} is inside the image folder {image_dir}, where it would be "
                          "trained as a class; move it out of the image folder")
    if img.startswith(ex + os.sep):
        raise ConfigError(f"--unknown-examples {folder} holds the image folder {image_dir}; give a folder of "
                          "photos that belong to none of the classes")


# ------------------------------------------------------------------------------ the ONNX nodes

def onnx_nodes(nov: Novelty, features: str, opset: int, output: str = OUTPUT):
    """(nodes, initializers, output value_info) computing `output` (N,) from the features tensor
    `features` (N, C) exactly as Novelty.score does. Node and tensor names start with "novelty_"."""
    from onnx import TensorProto, helper, numpy_helper

    p = "novelty_"
    R = np.ascontiguousarray(nov.references.T.astype(np.float16))  # (C, M)
    inits = [numpy_helper.from_array(R, p + "references"),
             numpy_helper.from_array(np.ones((R.shape[0], 1), np.float32), p + "ones"),
             numpy_helper.from_array(np.array(1e-12, np.float32), p + "eps"),
             numpy_helper.from_array(np.array(1.0, np.float32), p + "one")]
    n = helper.make_node
    nodes = [
        n("Sign", [features], [p + "sign"], name=p + "sign"),
        n("Abs", [features], [p + "abs"], name=p + "abs"),
        n("Sqrt", [p + "abs"], [p + "sqrt"], name=p + "sqrt"),
        n("Mul", [p + "sign", p + "sqrt"], [p + "t"], name=p + "t"),
        n("Mul", [p + "t", p + "t"], [p + "t2"], name=p + "t2"),
        n("MatMul", [p + "t2", p + "ones"], [p + "sumsq"], name=p + "sumsq"),  # (N, 1), any opset
        n("Sqrt", [p + "sumsq"], [p + "norm"], name=p + "norm"),
        n("Max", [p + "norm", p + "eps"], [p + "norm_eps"], name=p + "norm_eps"),
        n("Div", [p + "t", p + "norm_eps"], [p + "unit"], name=p + "unit"),
        n("Cast", [p + "references"], [p + "references_f32"], name=p + "cast", to=TensorProto.FLOAT),
        n("MatMul", [p + "unit", p + "references_f32"], [p + "similarity"], name=p + "similarity"),  # (N, M)
    ]
    if opset >= 18:  # ReduceMax takes its axes as an input from opset 18, as an attribute before
        inits.append(numpy_helper.from_array(np.array([1], np.int64), p + "axes"))
        nodes.append(n("ReduceMax", [p + "similarity", p + "axes"], [p + "nearest"], name=p + "nearest", keepdims=0))
    else:
        nodes.append(n("ReduceMax", [p + "similarity"], [p + "nearest"], name=p + "nearest", axes=[1], keepdims=0))
    nodes.append(n("Sub", [p + "one", p + "nearest"], [output], name=p + "score"))
    return nodes, inits, helper.make_tensor_value_info(output, TensorProto.FLOAT, ["N"])
