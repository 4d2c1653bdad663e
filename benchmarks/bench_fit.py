"""Issue 6 benchmark: bottleneck speed against the peers, whole-command targets, scaling.

    python benchmarks/bench_fit.py                 # peers side by side + command targets
    python benchmarks/bench_fit.py --scaling       # also 1x / 2x / 4x the photos
    python benchmarks/bench_fit.py --no-append     # print only, don't touch BENCHMARKS.md

In one process, on the same photos: retrain's cold bottleneck extraction (threaded decode +
ONNX Runtime), PyTorch eager extraction of the same backbone, and (when TensorFlow is
installed: pip install tensorflow-cpu) the TF2 codelab's Keras MobileNetV2 feature-vector
pipeline through image_dataset_from_directory (weights=None: nothing can be downloaded; the
compute is the same). Then the real CLI in subprocesses: cold fit (empty bottleneck cache),
warm fit (another learning rate), label of one image from process start, label of a folder,
peak memory. Figures are printed with ratios and appended to BENCHMARKS.md with the machine.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import FLOWERS, ROOT, Timer, append_markdown, machine, timed_cli  # noqa: E402


def pick(data: Path, n: int) -> list[Path]:
    files = sorted(p for p in data.glob("*/*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    step = max(1, len(files) // n)
    return files[::step][:n]


def bench_retrain(files, tmp, precision="fp32"):
    from retrain.backbones import get_backbone
    from retrain.bottlenecks import BottleneckCache, extract, feature_session
    from retrain.scan import ImageItem, digest_file

    bb = get_backbone("efficientnet_lite0")
    feature_session(bb, precision=precision)  # built outside the timing, like the other models
    items = [ImageItem(str(p), p.parent.name, *digest_file(str(p))) for p in files]
    cache = BottleneckCache(tmp / f"bench-cache-{precision}", bb, precision=precision)
    with Timer() as t:
        feats, fails, timing = extract(items, bb, cache, quiet=True)
    return len(files) / t.s, timing, feats


def bench_torch(files):
    import torch

    from retrain import images
    from retrain.backbones import build_torch, feature_module, get_backbone

    torch.set_num_threads(os.cpu_count())
    bb = get_backbone("efficientnet_lite0")
    model = feature_module(build_torch(bb))
    with Timer() as t, torch.inference_mode():
        for i in range(0, len(files), 32):
            batch = np.stack([images.load(str(p), bb.image_size, bb.crop_fraction) for p in files[i:i + 32]])
            model(torch.from_numpy(images.normalize(batch, bb.mean, bb.std)))
    return len(files) / t.s


def bench_keras(files, tmp):
    try:
        import tensorflow as tf
    except ImportError:
        return None
    d = tmp / "keras-data"
    for p in files:
        (d / p.parent.name).mkdir(parents=True, exist_ok=True)
        os.symlink(p, d / p.parent.name / p.name)
    model = tf.keras.applications.MobileNetV2(weights=None, include_top=False, pooling="avg",
                                              input_shape=(224, 224, 3))
    pre = tf.keras.applications.mobilenet_v2.preprocess_input

    def dataset():
        ds = tf.keras.utils.image_dataset_from_directory(str(d), image_size=(224, 224), batch_size=32,
                                                         shuffle=False, verbose=False)
        return ds.map(lambda x, y: pre(x)).prefetch(tf.data.AUTOTUNE)

    model.predict(dataset().take(1), verbose=0)  # trace once, outside the timing
    with Timer() as t:
        model.predict(dataset(), verbose=0)
    return len(files) / t.s


def command_targets(data: Path, tmp: Path) -> dict:
    from retrain.backbones import features_onnx, get_backbone

    features_onnx(get_backbone("efficientnet_lite0"))  # one-time export, not part of a "cold" fit
    cache = tmp / "cli-cache"
    n = sum(1 for p in data.glob("*/*") if p.is_file())
    cold, cold_rss, r = timed_cli("fit", data, "-o", tmp / "run", "--cache-dir", cache, "-q")
    cold8, _, r8 = timed_cli("fit", data, "-o", tmp / "run8", "--cache-dir", tmp / "cli-cache8", "-q",
                             "--bottleneck-precision", "int8")
    warm, warm_rss, _ = timed_cli("fit", data, "-o", tmp / "run2", "--cache-dir", cache, "-q", "--l2", "0.01")
    one = sorted(data.glob("*/*.jpg"))[0]
    label1 = min(timed_cli("label", tmp / "run", one)[0] for _ in range(3))
    folder = tmp / "label-folder"
    folder.mkdir()
    for p in sorted(data.glob("*/*.jpg"))[:400]:
        os.symlink(p, folder / f"{p.parent.name}_{p.name}")
    lf, _, _ = timed_cli("label", tmp / "run", folder, "--json", "-q")
    return {"images": n, "cold_s": cold, "cold8_s": cold8, "summary8": r8.stdout.strip(), "cold_rss_mb": cold_rss, "warm_s": warm, "warm_rss_mb": warm_rss,
            "label_one_s": label1, "label_folder_ips": 400 / lf, "summary": r.stdout.strip()}


def scaling(data: Path, tmp: Path, base: int) -> list[dict]:
    """Fit on 1x, 2x, 4x distinct photos (re-encoded copies) with an empty cache each time."""
    from PIL import Image

    src = pick(data, base)
    rows = []
    for mult in (1, 2, 4):
        d = tmp / f"scale{mult}"
        for k in range(mult):
            for p in src:
                out = d / p.parent.name / f"{p.stem}_q{k}.jpg"
                out.parent.mkdir(parents=True, exist_ok=True)
                Image.open(p).convert("RGB").save(out, quality=92 - k)  # distinct bytes, same look
        wall, rss, _ = timed_cli("fit", d, "-o", tmp / f"run{mult}", "--cache-dir", tmp / f"c{mult}", "-q")
        rows.append({"images": base * mult, "wall_s": wall, "rss_mb": rss})
        shutil.rmtree(d)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=FLOWERS)
    ap.add_argument("--n", type=int, default=600, help="photos for the side-by-side extraction")
    ap.add_argument("--scaling", action="store_true")
    ap.add_argument("--scaling-base", type=int, default=500)
    ap.add_argument("--no-append", action="store_true")
    ap.add_argument("--skip-torch", action="store_true")
    args = ap.parse_args()
    if not args.data.is_dir():
        raise SystemExit(f"data folder not found: {args.data}")
    tmp = Path(tempfile.mkdtemp(prefix="retrain-bench-"))
    try:
        files = pick(args.data, args.n)
        print(f"machine: {machine()}")
        r_ips, timing, _ = bench_retrain(files, tmp)
        print(f"retrain bottlenecks (cold): {r_ips:7.1f} images/s   {timing}")
        r8_ips, _, _ = bench_retrain(files, tmp, "int8")
        print(f"retrain bottlenecks, int8 (cold): {r8_ips:7.1f} images/s")
        t_ips = None if args.skip_torch else bench_torch(files)
        if t_ips:
            print(f"PyTorch eager, same backbone: {t_ips:7.1f} images/s   retrain is {r_ips / t_ips:.2f}x")
        k_ips = bench_keras(files, tmp)
        if k_ips:
            print(f"Keras MobileNetV2 pipeline: {k_ips:7.1f} images/s   retrain is {r_ips / k_ips:.2f}x "
                  f"(int8: {r8_ips / k_ips:.2f}x)")
        else:
            print("Keras MobileNetV2 pipeline: skipped (TensorFlow not installed: pip install tensorflow-cpu)")
        c = command_targets(args.data, tmp)
        print(f"cold fit of {c['images']} photos: {c['cold_s']:.1f} s wall, peak {c['cold_rss_mb']} MiB "
              f"({c['images'] / c['cold_s']:.0f} images/s end to end)\n  {c['summary']}")
        print(f"cold fit, --bottleneck-precision int8: {c['cold8_s']:.1f} s wall "
              f"({c['images'] / c['cold8_s']:.0f} images/s end to end)\n  {c['summary8']}")
        print(f"warm fit (all cached, other L2): {c['warm_s']:.2f} s wall, peak {c['warm_rss_mb']} MiB")
        print(f"label one image from process start: {c['label_one_s']:.2f} s; label a folder: "
              f"{c['label_folder_ips']:.0f} images/s")
        rows = scaling(args.data, tmp, args.scaling_base) if args.scaling else []
        for r in rows:
            print(f"scaling: {r['images']:5d} images  {r['wall_s']:6.1f} s  {r['images'] / r['wall_s']:6.1f} images/s  "
                  f"peak {r['rss_mb']} MiB")
        if not args.no_append:
            lines = [f"Machine: {machine()}", "", f"Command: `python benchmarks/bench_fit.py"
                     f"{' --scaling' if args.scaling else ''}` on {args.data.name}", "",
                     f"| pipeline ({len(files)} photos, cold) | images/s | retrain is |", "|---|---:|---:|",
                     f"| retrain bottlenecks (threaded decode + ONNX Runtime) | {r_ips:.1f} | 1.00x |",
                     f"| retrain bottlenecks, `--bottleneck-precision int8` | {r8_ips:.1f} | int8 is {r8_ips / r_ips:.2f}x fp32 |"]
            if t_ips:
                lines.append(f"| PyTorch eager, same EfficientNet-Lite0 | {t_ips:.1f} | {r_ips / t_ips:.2f}x |")
            lines.append("| Keras MobileNetV2 via image_dataset_from_directory | "
                         + (f"{k_ips:.1f} | {r_ips / k_ips:.2f}x (int8: {r8_ips / k_ips:.2f}x) |"
                            if k_ips else "not installed | - |"))
            lines += ["", "| whole command | figure | target |", "|---|---:|---:|",
                      f"| cold `retrain fit` ({c['images']} photos, empty cache) | {c['cold_s']:.1f} s | <= 20 s |",
                      f"| cold `retrain fit --bottleneck-precision int8` | {c['cold8_s']:.1f} s "
                      f"({c['images'] / c['cold8_s']:.0f} images/s) | - |",
                      f"| warm `retrain fit` (cached, other L2) | {c['warm_s']:.2f} s | <= 3 s |",
                      f"| `retrain label RUN one.jpg` from process start | {c['label_one_s']:.2f} s | <= 0.5 s |",
                      f"| `retrain label RUN folder/` (400 photos) | {c['label_folder_ips']:.0f} images/s | >= 100 |",
                      f"| peak memory of cold fit | {c['cold_rss_mb']} MiB | <= 1536 MiB |",
                      "", f"Fit summary: `{c['summary']}`", "", f"int8 fit summary: `{c['summary8']}`"]
            if rows:
                lines += ["", "| scaling (distinct re-encoded photos, empty cache) | wall | images/s | peak memory |",
                          "|---|---:|---:|---:|"]
                lines += [f"| {r['images']} | {r['wall_s']:.1f} s | {r['images'] / r['wall_s']:.1f} | {r['rss_mb']} MiB |"
                          for r in rows]
            append_markdown(ROOT / "BENCHMARKS.md", "Bottlenecks and whole commands (issue 6)", "\n".join(lines))
            print("appended to BENCHMARKS.md")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
