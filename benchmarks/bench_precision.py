"""fp32 vs bf16 vs int8 bottlenecks: extraction speed (same process) and test accuracy of the same head.

    python benchmarks/bench_precision.py [--data ../shared/data/flower_photos] [--no-append]

Each precision extracts every photo cold (fresh caches), on the same split, and the final
layer is trained the same way (L-BFGS, L2 chosen on validation) on each; the test split is
only scored. A reduced precision is allowed for bottlenecks only if test accuracy moves
<= 0.5 pt. bf16 (OpenVINO) is measured where the CPU has bf16 units and OpenVINO is installed.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import FLOWERS, ROOT, append_markdown, machine  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, default=FLOWERS)
    ap.add_argument("--no-append", action="store_true")
    args = ap.parse_args()
    from retrain.architectures import get_backbone
    from retrain.bottlenecks import choose_precision, extract, feature_session
    from retrain.cache import BottleneckCache
    from retrain.scan import scan
    from retrain.split import split_items
    from retrain.head import train_lbfgs

    bb = get_backbone("efficientnet_lite0")
    s = scan(args.data, quiet=True)
    tmp = Path(tempfile.mkdtemp(prefix="retrain-prec-"))
    res = {}
    try:
        precs = ["fp32"] + (["bf16"] if choose_precision("auto") == "bf16" else []) + ["int8"]
        for prec in precs:
            feature_session(bb, precision=prec)  # build (and quantize) outside the timing
            cache = BottleneckCache(tmp / prec, bb, precision=prec)
            t = time.perf_counter()
            X, fails, _ = extract(s.items, bb, cache, quiet=True)
            secs = time.perf_counter() - t
            ok = [i for i, it in enumerate(s.items) if it.path not in fails]
            items = [s.items[i] for i in ok]
            X = X[ok]
            assign = split_items(items, classes=s.classes)
            y = np.array([s.classes.index(it.label) for it in items])
            idx = {n: np.array([i for i, it in enumerate(items) if assign[it.path] == n]) for n in
                   ("train", "validation", "test")}
            head = train_lbfgs(X[idx["train"]], y[idx["train"]], X[idx["validation"]], y[idx["validation"]],
                               len(s.classes))[0]
            acc = {n: float((head.probs(X[i]).argmax(1) == y[i]).mean()) for n, i in idx.items()}
            res[prec] = {"ips": len(s.items) / secs, "secs": secs, **acc, "n_test": len(idx["test"])}
            print(f"{prec}: {res[prec]['ips']:.1f} images/s ({secs:.1f} s), validation {acc['validation']:.4f}, "
                  f"test {acc['test']:.4f} (n={len(idx['test'])})")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    vs = {p: (res[p]["ips"] / res["fp32"]["ips"], (res[p]["test"] - res["fp32"]["test"]) * 100)
          for p in res if p != "fp32"}
    for p, (speed, delta) in vs.items():
        print(f"{p} is {speed:.2f}x fp32; test accuracy change {delta:+.2f} points")
    if not args.no_append:
        body = "\n".join([
            f"Machine: {machine()}", "", f"Command: `python benchmarks/bench_precision.py` on {args.data.name}", "",
            "| bottleneck precision | extraction images/s (cold) | validation acc. | test acc. |", "|---|---:|---:|---:|",
            *[f"| {p} | {r['ips']:.1f} | {r['validation'] * 100:.2f}% | {r['test'] * 100:.2f}% (n={r['n_test']}) |"
              for p, r in res.items()],
            "", *[f"{p} / fp32 speed: {speed:.2f}x; test accuracy change: {delta:+.2f} points." for p, (speed, delta)
                  in vs.items()]])
        append_markdown(ROOT / "BENCHMARKS.md", "Bottleneck precision: " + " vs ".join(res), body)


if __name__ == "__main__":
    main()
