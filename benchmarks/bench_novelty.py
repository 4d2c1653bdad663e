"""Open-set rejection ("unknown"): which novelty score, measured on photos the model never saw.

    python benchmarks/outside_photos.py /tmp/outside [--wheel ...]   # real photos that are not flowers
    python benchmarks/bench_novelty.py [--data ../shared/data/flower_photos] [--outside /tmp/outside]
                                       [--end-to-end]

The flowers' bottlenecks come from the cache `retrain fit` fills (seconds once it is warm), on
the split `retrain fit` makes. Two parts:

1. Methods, one protocol for all: each is fitted on the training split, its threshold is the
   split-conformal 95% quantile of its validation scores, and it is measured on
   - the open-set protocol: each class in turn left out of training and validation; its photos
     (all of them) are the outside photos, the other classes' test photos the inside ones;
   - each folder under --outside (another domain): the model of all five classes, against the
     test photos.
   Figures: AUROC (outside scored above inside), the share of outside photos rejected at the
   threshold, the share of inside test photos rejected (asked: 5%).
   Methods: the softmax's top score (L-BFGS head, L2 chosen on validation); Mahalanobis distance
   to the nearest class mean under a shared covariance with Ledoit-Wolf shrinkage (float64), on
   raw and on L2-normalised features; cosine k-NN distance on raw features (k = 1, 10), and on
   signed square roots (k = 1: what retrain ships) and cube roots.
2. Shipped: retrain.novelty.fit exactly as `retrain fit` runs it (references: train + validation,
   threshold leave-one-out split-conformal at 95%), on the same protocol and folders; with
   --end-to-end also through the real CLI: `retrain fit` then `retrain evaluate RUN TEST_PHOTOS
   --unknown-dir DIR --json` for each folder (model.onnx's own novelty output, fp32 backbone).

Writes benchmarks/results/novelty.json and novelty.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import FLOWERS, ROOT, machine  # noqa: E402

COVERAGE = 0.95


# ------------------------------------------------------------------------------ the methods

def lw_covariance(Xc: np.ndarray) -> np.ndarray:
    """Ledoit-Wolf shrinkage of the covariance of centred rows towards a scaled identity (float64)."""
    n, p = Xc.shape
    S = Xc.T @ Xc / n
    mu = np.trace(S) / p
    d2 = ((S - mu * np.eye(p)) ** 2).sum()
    X2 = Xc ** 2
    b2 = min(((X2.T @ X2) / n - S ** 2).sum() / n, d2)
    a = b2 / d2 if d2 > 0 else 1.0
    return (1 - a) * S + a * mu * np.eye(p)


class Mahalanobis:
    def __init__(self, X, y, k, Xv, yv, normalise=False):
        self.normalise = normalise
        X = self.pre(X)
        self.mu = np.stack([X[y == c].mean(0) for c in range(k)])
        L = np.linalg.cholesky(np.linalg.inv(lw_covariance(X - self.mu[y])))  # P = L L^T
        self.L, self.muL = L, self.mu @ L

    def pre(self, X):
        X = np.asarray(X, np.float64)
        return X / np.linalg.norm(X, axis=1, keepdims=True) if self.normalise else X

    def score(self, X):
        Z = self.pre(X) @ self.L
        return np.stack([((Z - m) ** 2).sum(1) for m in self.muL], 1).min(1)


class Knn:
    def __init__(self, X, y, k, Xv, yv, neighbours=1, power=1.0):
        self.n, self.power = neighbours, power
        self.R = self.pre(X)

    def pre(self, X):
        X = np.asarray(X, np.float32)
        T = np.sign(X) * np.abs(X) ** self.power
        return T / np.maximum(np.linalg.norm(T, axis=1, keepdims=True), 1e-12)

    def score(self, X):
        S = self.pre(X) @ self.R.T
        return 1.0 - np.sort(S, 1)[:, -self.n]


class Shipped(Knn):
    """retrain.novelty's score (k = 1, signed square roots, float16 references) on given references."""

    def __init__(self, X, y, k, Xv, yv):
        from retrain.novelty import Novelty, transform

        self.nov = Novelty(transform(X).astype(np.float16), np.asarray(y), None, COVERAGE)

    def score(self, X):
        return self.nov.score(X)


class TopScore:
    def __init__(self, X, y, k, Xv, yv):
        from retrain.head import train_lbfgs

        self.head = train_lbfgs(np.asarray(X, np.float32), y, np.asarray(Xv, np.float32), yv, k)[0]

    def score(self, X):
        return 1.0 - self.head.probs(np.asarray(X, np.float32)).max(1)


METHODS = {
    "softmax top score": TopScore,
    "Mahalanobis, shared LW covariance": Mahalanobis,
    "Mahalanobis, LW, L2-normalised": lambda *a: Mahalanobis(*a, normalise=True),
    "k-NN cosine, raw, k=1": Knn,
    "k-NN cosine, raw, k=10": lambda *a: Knn(*a, neighbours=10),
    "k-NN cosine, cube roots, k=1": lambda *a: Knn(*a, power=1 / 3),
    "k-NN cosine, square roots, k=1 (retrain)": Shipped,
}


# ------------------------------------------------------------------------------ the data

def load_flowers(data: Path, tmp: Path):
    from retrain.config import FitConfig
    from retrain.fit_data import load_data, plan_fit
    from retrain.progress import Log

    plan = plan_fit(FitConfig(image_dir=str(data), output=str(tmp / "never-written"), quiet=True))
    t = time.perf_counter()
    d = load_data(plan, Log(True))
    return plan, d, time.perf_counter() - t


def outside_features(plan, d, folder: Path) -> dict:
    """{set name: features} for each subfolder of `folder` (or the folder itself), by the same
    backbone and bottleneck precision as the flowers (the same cache)."""
    from retrain.bottlenecks import extract
    from retrain.novelty import list_photos
    from retrain.scan import ImageItem, digest_file

    subs = sorted(p for p in folder.iterdir() if p.is_dir()) or [folder]
    out = {}
    for sub in subs:
        items = [ImageItem(p, sub.name, *digest_file(p)) for p in list_photos(sub, flag="--outside")]
        X, _fails, _ = extract(items, plan.backbone, d.cache, quiet=True)
        out[sub.name] = X[np.isfinite(X).all(1)]
    return out


def auroc(a, b):
    from retrain.novelty import auroc as au

    return au(a, b)


def rate(s, t):
    return float((np.asarray(s) > t).mean()) if t is not None and len(s) else None


# ------------------------------------------------------------------------------ part 1

def compare_methods(d, outside: dict) -> dict:
    from retrain.novelty import conformal_threshold

    X, y, labels = d.X, d.y, d.labels
    tr, va, te = d.parts["train"], d.parts["validation"], d.parts["test"]
    K = len(labels)
    res = {}
    for name, make in METHODS.items():
        t0 = time.perf_counter()
        rows = []
        for c in range(K):
            keep = [k for k in range(K) if k != c]
            remap = np.full(K, -1)
            remap[keep] = np.arange(K - 1)
            trc, vac, tec = tr[y[tr] != c], va[y[va] != c], te[y[te] != c]
            m = make(X[trc], remap[y[trc]], K - 1, X[vac], remap[y[vac]])
            thr = conformal_threshold(m.score(X[vac]), COVERAGE)
            s_in, s_out = m.score(X[tec]), m.score(X[y == c])
            rows.append({"class": labels[c], "auroc": auroc(s_in, s_out), "rejected": rate(s_out, thr),
                         "inside_rejected": rate(s_in, thr)})
        m = make(X[tr], y[tr], K, X[va], y[va])
        thr = conformal_threshold(m.score(X[va]), COVERAGE)
        s_in = m.score(X[te])
        dom = {k: {"n": len(v), "auroc": auroc(s_in, m.score(v)), "rejected": rate(m.score(v), thr)}
               for k, v in outside.items()}
        res[name] = {"held_out": rows, "mean_auroc": float(np.mean([r["auroc"] for r in rows])),
                     "mean_rejected": float(np.mean([r["rejected"] for r in rows])),
                     "mean_inside_rejected": float(np.mean([r["inside_rejected"] for r in rows])),
                     "test_rejected": rate(s_in, thr), "outside": dom, "seconds": round(time.perf_counter() - t0, 2)}
        print(f"{name:44s} held-out AUROC {res[name]['mean_auroc']:.3f}, rejected {res[name]['mean_rejected']:.1%}"
              f" (inside {res[name]['mean_inside_rejected']:.1%})  "
              + "  ".join(f"{k}: {v['rejected']:.1%}" for k, v in dom.items()), flush=True)
    return res


# ------------------------------------------------------------------------------ part 2

def shipped(d, outside: dict, power: float | None = None) -> dict:
    """retrain.novelty.fit as `retrain fit` runs it; with `power`, the same with sign(x)|x|^power
    in place of the square roots (numpy only: what another choice would have given)."""
    from retrain import novelty

    ship = novelty.transform
    if power is not None:
        def transform(X):
            X = np.asarray(X, np.float32)
            T = np.sign(X) * np.abs(X) ** np.float32(power)
            return T / np.maximum(np.linalg.norm(T, axis=1, keepdims=True), np.float32(1e-12))

        novelty.transform = transform
    try:
        t0 = time.perf_counter()
        nov = novelty.fit(d.X, d.y, d.parts, d.labels, digests=[it.digest for it in d.items])
        secs = time.perf_counter() - t0
        rep = dict(nov.report)
        rep.pop("histogram", None)
        s_in = nov.score(d.X[d.parts["test"]])
        rep["outside"] = {k: {"n": len(v), "auroc": auroc(s_in, nov.score(v)),
                              "rejected": rate(nov.score(v), nov.threshold)} for k, v in outside.items()}
    finally:
        novelty.transform = ship
    rep["seconds"] = round(secs, 3)
    return rep


def end_to_end(data: Path, d, outside_dir: Path, tmp: Path) -> dict:
    """The real CLI: fit, then evaluate the test photos with each outside folder as --unknown-dir."""
    def cli(*args):
        t = time.perf_counter()
        p = subprocess.run([sys.executable, "-m", "retrain", *map(str, args)], capture_output=True, text=True)
        if p.returncode:
            raise SystemExit(f"retrain {' '.join(map(str, args))} failed:\n{p.stderr[-2000:]}")
        return p, time.perf_counter() - t

    run = tmp / "run"
    _, fit_s = cli("fit", data, "-o", run, "-q")
    split = json.loads((run / "split.json").read_text())
    test = tmp / "test-photos"
    for rel in split["files"]["test"]:
        dst = test / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(Path(data) / rel, dst)
    out = {"fit_s": round(fit_s, 1), "commands": [f"retrain fit {data} -o RUN"], "sets": {}}
    subs = sorted(p for p in outside_dir.iterdir() if p.is_dir()) or [outside_dir]
    for sub in subs:
        p, secs = cli("evaluate", run, test, "--unknown-dir", sub, "--json", "-q")
        o = json.loads(p.stdout)
        out["sets"][sub.name] = {"accuracy": o["accuracy"], "inside_rejected": o["open_set"]["inside"]["rejected"],
                                 "outside_n": o["open_set"]["outside"]["n"],
                                 "outside_rejected": o["open_set"]["outside"]["rejected"],
                                 "auroc": o["open_set"]["auroc"], "seconds": round(secs, 1)}
        out["commands"].append(f"retrain evaluate RUN TEST_PHOTOS --unknown-dir {sub} --json")
    out["report_novelty_test_rejected"] = json.loads((run / "report.json").read_text())["novelty"]["test"]["rejected"]
    out["model_mb"] = round((run / "model.onnx").stat().st_size / 2**20, 1)
    return out


# ------------------------------------------------------------------------------ output

def pct(v):
    return "n/a" if v is None else f"{v * 100:.1f}%"


def markdown(res: dict) -> str:
    lines = [f"Machine: {res['machine']}. Flowers: {res['n_photos']} photos, split {res['split']}; "
             f"bottlenecks {res['precision']} (loaded in {res['load_s']:.1f} s).", ""]
    sets = list(res["outside_sets"])
    lines.append("Methods (threshold: conformal 95% of validation; held-out: mean over the 5 classes):")
    lines.append("")
    lines.append("| method | held-out AUROC | held-out rejected | inside rejected | "
                 + " | ".join(f"{s} (n={res['outside_sets'][s]}) AUROC / rejected" for s in sets) + " |")
    lines.append("|---|---:|---:|---:|" + "---:|" * len(sets))
    for name, r in res["methods"].items():
        lines.append(f"| {name} | {r['mean_auroc']:.3f} | {pct(r['mean_rejected'])} | {pct(r['mean_inside_rejected'])} | "
                     + " | ".join(f"{r['outside'][s]['auroc']:.3f} / {pct(r['outside'][s]['rejected'])}" for s in sets)
                     + " |")
    sh = res["shipped"]
    h = sh["held_out_classes"]
    lines += ["", f"Shipped (`retrain fit`'s own novelty.fit: references train + validation, threshold "
              f"{sh['threshold']:.4f} leave-one-out conformal at 95%; {sh['seconds']:.2f} s): test photos rejected "
              f"{pct(sh['test']['rejected'])}.", "",
              "| class left out | its photos | AUROC | rejected | inside rejected |", "|---|---:|---:|---:|---:|"]
    for r in h["classes"]:
        lines.append(f"| {r['class']} | {r['n_outside']} | {r['auroc']:.3f} | {pct(r['rejected'])} | "
                     f"{pct(r['inside_rejected'])} |")
    lines.append(f"| mean | | {h['mean_auroc']:.3f} | {pct(h['mean_rejected'])} | {pct(h['mean_inside_rejected'])} |")
    lines += ["", "| outside set | photos | AUROC | rejected |", "|---|---:|---:|---:|"]
    for s, v in sh["outside"].items():
        lines.append(f"| {s} | {v['n']} | {v['auroc']:.3f} | {pct(v['rejected'])} |")
    cb = res.get("shipped_cube_roots")
    if cb:
        h = cb["held_out_classes"]
        lines += ["", f"The same with cube roots in place of square roots (threshold {cb['threshold']:.4f}): test photos "
                  f"rejected {pct(cb['test']['rejected'])}; held-out AUROC {h['mean_auroc']:.3f}, rejected "
                  f"{pct(h['mean_rejected'])}; " + ", ".join(f"{s} {pct(v['rejected'])} rejected (AUROC {v['auroc']:.3f})"
                                                            for s, v in cb["outside"].items()) + "."]
    e2e = res.get("end_to_end")
    if e2e:
        lines += ["", f"End to end (real CLI, model.onnx's novelty output, fp32 backbone; fit {e2e['fit_s']} s, "
                  f"model {e2e['model_mb']} MiB): `" + "`, `".join(e2e["commands"]) + "`", "",
                  "| --unknown-dir | photos | rejected | AUROC | test photos rejected | closed-set accuracy |",
                  "|---|---:|---:|---:|---:|---:|"]
        for s, v in e2e["sets"].items():
            lines.append(f"| {s} | {v['outside_n']} | {pct(v['outside_rejected'])} | {v['auroc']:.3f} | "
                         f"{pct(v['inside_rejected'])} | {pct(v['accuracy'])} |")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, default=FLOWERS)
    ap.add_argument("--outside", type=Path, help="folder of outside photos (subfolders: one set each)")
    ap.add_argument("--end-to-end", action="store_true", help="also through the real CLI (fit + evaluate)")
    args = ap.parse_args()
    if not args.data.is_dir():
        raise SystemExit(f"no flowers at {args.data}")
    tmp = Path(tempfile.mkdtemp(prefix="retrain-novelty-"))
    try:
        plan, d, load_s = load_flowers(args.data, tmp)
        outside = outside_features(plan, d, args.outside) if args.outside else {}
        res = {"machine": machine(), "n_photos": len(d.items), "precision": plan.precision,
               "split": {k: len(v) for k, v in d.parts.items()}, "load_s": load_s,
               "outside_sets": {k: len(v) for k, v in outside.items()}, "coverage": COVERAGE,
               "outside_dir": str(args.outside) if args.outside else None}
        res["methods"] = compare_methods(d, outside)
        res["shipped"] = shipped(d, outside)
        res["shipped_cube_roots"] = shipped(d, outside, power=1 / 3)
        if args.end_to_end and args.outside:
            res["end_to_end"] = end_to_end(args.data, d, args.outside, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "novelty.json").write_text(json.dumps(res, indent=1, default=str) + "\n")
    md = markdown(res)
    (out / "novelty.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
