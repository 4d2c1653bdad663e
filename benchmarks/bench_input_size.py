"""Which input side for head-only features: validation accuracy of `retrain fit --input_height N`.

EfficientNet-Lite was trained on random-resized crops at 224 px (lite0), so a centre crop at
the same side shows objects smaller than in training; features computed at a larger side can
score better (FixRes, Touvron et al. 2019). This runs the real CLI once per (backbone, side)
with a bottleneck cache of its own and prints the selection head's validation accuracy and
cross entropy (the split's validation photos, the head trained on the training split only),
and, from the same cached bottlenecks, 5-fold cross-validation over the training and
validation photos together (2,636 photos instead of 281: a less noisy comparison, for two
assignments of the folds). The test split is not used: the side is chosen on validation.

    python benchmarks/bench_input_size.py [--data ../shared/data/flower_photos]
        [--sizes efficientnet_lite0:224,256,288,320 efficientnet_lite1:240,280]
    python benchmarks/bench_input_size.py --sizes efficientnet_lite0:288 efficientnet_lite1:280 \
        efficientnet_lite0+efficientnet_lite1:224,288 --out benchmarks/results/features-concat.md

ARCH may join built-in backbones with '+' (their features side by side, as the default does).

Writes benchmarks/results/input-size.md (and .json).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "flower_photos"


def fit(data: Path, arch: str, side: int, work: Path) -> dict:
    run_dir, cache = work / f"{arch}-{side}", work / f"cache-{arch}-{side}"
    cmd = [sys.executable, "-m", "retrain", "fit", str(data), "-o", str(run_dir), "--cache-dir", str(cache),
           "--architecture", arch, "--input_height", str(side), "--no-label-check", "-q"]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stderr[-2000:]}")
    rep = json.loads((run_dir / "report.json").read_text())
    va = rep["metrics"]["validation"]
    return cross_validated(data, arch, side, cache) | {"architecture": arch, "side": side, "validation_accuracy": va["accuracy"], "validation_n": va["n"],
            "validation_cross_entropy": va["cross_entropy"], "l2": rep["train"].get("l2"),
            "bottleneck_precision": rep["train"].get("bottleneck_precision") or rep.get("bottleneck_precision"),
            "bottlenecks_s": rep["timings"].get("bottlenecks_s"), "wall_s": round(wall, 1)}


def cross_validated(data: Path, arch: str, side: int, cache: Path) -> dict:
    """5-fold cross-validation of the head on the train + validation photos' cached bottlenecks."""
    import numpy as np

    from retrain.config import FitConfig
    from retrain.fit_data import load_data, plan_fit
    from retrain.head import cross_validate
    from retrain.progress import Log

    cfg = FitConfig(image_dir=str(data), output=str(cache.parent / f"cv-{arch}-{side}"), architecture=arch,
                    input_height=side, cache_dir=str(cache), quiet=True)
    d = load_data(plan_fit(cfg), Log.silent())  # every bottleneck from the fit's cache
    idx = np.concatenate([d.parts["train"], d.parts["validation"]])
    out = {"cv_n": int(len(idx))}
    for seed in (0, 1):
        r = cross_validate(d.X[idx], d.y[idx], len(d.labels), folds=5, seed=seed)
        best = min(r["grid"], key=lambda g: g["cross_entropy"])
        out[f"cv_accuracy_{seed}"], out[f"cv_cross_entropy_{seed}"] = best["accuracy"], best["cross_entropy"]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--sizes", nargs="+", default=["efficientnet_lite0:224,256,288,320", "efficientnet_lite1:240,280"],
                    help="ARCH:SIDE,SIDE,... (one per backbone)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "input-size.md")
    a = ap.parse_args()
    if not a.data.is_dir():
        sys.exit(f"data not found: {a.data}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-input-size-") as tmp:
        for spec in a.sizes:
            arch, sides = spec.split(":")
            for side in (int(s) for s in sides.split(",")):
                r = fit(a.data, arch, side, Path(tmp))
                print(f"{arch} {side} px: validation {r['validation_accuracy']:.2%} (n={r['validation_n']}), "
                      f"cross entropy {r['validation_cross_entropy']:.4f}; 5-fold CV {r['cv_accuracy_0']:.2%} / "
                      f"{r['cv_accuracy_1']:.2%}; bottlenecks {r['bottlenecks_s']:.1f} s",
                      flush=True)
                rows.append(r)
    from common import machine

    lines = ["# Input side for head-only features (`benchmarks/bench_input_size.py`)", "",
             f"Machine: {machine()} (load average {os.getloadavg()[0]:.1f} at the end). Data: {a.data.name}; "
             "the validation split, and 5-fold cross-validation over train + validation (two fold "
             "assignments); the test split is not used. Cold: a fresh bottleneck cache for each row.", "",
             "| backbone | side | validation accuracy | validation cross entropy | 5-fold CV accuracy (seeds 0 / 1) "
             "| 5-fold CV cross entropy | L2 chosen | bottlenecks |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['architecture']} | {r['side']} px | {r['validation_accuracy']:.2%} (n={r['validation_n']}) "
                     f"| {r['validation_cross_entropy']:.4f} | {r['cv_accuracy_0']:.2%} / {r['cv_accuracy_1']:.2%} "
                     f"(n={r['cv_n']}) | {r['cv_cross_entropy_0']:.4f} / {r['cv_cross_entropy_1']:.4f} | {r['l2']} "
                     f"| {r['bottlenecks_s']:.1f} s |")
    lines += ["", f"Reproduce: `python benchmarks/bench_input_size.py --sizes {' '.join(a.sizes)}`", ""]
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text("\n".join(lines))
    a.out.with_suffix(".json").write_text(json.dumps({"machine": machine(), "rows": rows}, indent=1) + "\n")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
