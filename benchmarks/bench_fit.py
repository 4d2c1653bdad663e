"""Issue 6 benchmark: bottleneck speed against the peers, whole-command targets, scaling.

    python benchmarks/bench_fit.py                 # peers side by side + command targets
    python benchmarks/bench_fit.py --scaling       # also 1x / 2x / 4x the photos
    python benchmarks/bench_fit.py --no-append     # print only, don't touch BENCHMARKS.md

In one process, on the same photos: retrain's cold bottleneck extraction (threaded decode +
the default engine: bf16 on OpenVINO where the CPU has bf16 units, else fp32 on ONNX
Runtime; then fp32 and int8 explicitly), PyTorch eager extraction of the same backbone, and
(when TensorFlow is installed: pip install tensorflow-cpu) the TF2 codelab's Keras MobileNetV2
feature-vector pipeline through image_dataset_from_directory (weights=None: nothing can be
downloaded; the compute is the same), timed in steady state (after tracing).

Then whole commands in fresh processes, on the whole data folder: the Keras pipeline as a
script (import TensorFlow, build the model, read the folder, compute every feature vector:
what a codelab user waits for), cold `retrain fit` (empty bottleneck cache) in the default,
fp32 and int8 precisions, warm fit (another L2), label of one image from process start, label
of a folder, peak memory. Cold fit images/s are compared with both Keras figures. Everything
is printed with ratios and appended to BENCHMARKS.md with the machine.
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


def bench_retrain(files, tmp, precision="fp32", tag=""):
    from retrain.architectures import get_backbone
    from retrain.bottlenecks import choose_precision, extract, feature_session
    from retrain.cache import BottleneckCache
    from retrain.scan import ImageItem, digest_file

    bb = get_backbone("efficientnet_lite0")
    precision = choose_precision(precision)
    feature_session(bb, precision=precision)  # built outside the timing, like the other models
    items = [ImageItem(str(p), p.parent.name, *digest_file(str(p))) for p in files]
    cache = BottleneckCache(tmp / f"bench-cache-{precision}{tag}", bb, precision=precision)
    with Timer() as t:
        feats, fails, timing = extract(items, bb, cache, quiet=True)
    return len(files) / t.s, timing, feats


def bench_torch(files):
    import torch

    from retrain import images
    from retrain.architectures import get_backbone
    from retrain.features import build_torch, feature_module

    torch.set_num_threads(os.cpu_count())
    bb = get_backbone("efficientnet_lite0")
    model = feature_module(build_torch(bb))
    with Timer() as t, torch.inference_mode():
        for i in range(0, len(files), 32):
            batch = np.stack([images.load(str(p), bb.image_size, bb.crop_fraction) for p in files[i:i + 32]])
            model(torch.from_numpy(images.normalize(batch, bb.mean, bb.std)))
    return len(files) / t.s


def keras_runner(files, tmp):
    """Set up the Keras pipeline (model built, graph traced); returns a function that times one
    pass over `files` (images/s), or None without TensorFlow."""
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

    def run() -> float:
        with Timer() as t:
            model.predict(dataset(), verbose=0)
        return len(files) / t.s
    return run


KERAS_SCRIPT = """
import sys, time
t = time.perf_counter()
import tensorflow as tf
model = tf.keras.applications.MobileNetV2(weights=None, include_top=False, pooling="avg", input_shape=(224, 224, 3))
ds = tf.keras.utils.image_dataset_from_directory(sys.argv[1], image_size=(224, 224), batch_size=32, shuffle=False,
                                                 verbose=False)
feats = model.predict(ds.map(lambda x, y: tf.keras.applications.mobilenet_v2.preprocess_input(x))
                      .prefetch(tf.data.AUTOTUNE), verbose=0)
print(len(feats), time.perf_counter() - t)
"""


def keras_whole_process(data: Path) -> tuple[float, int] | None:
    """The Keras pipeline as a user runs it: a fresh process over the whole folder (wall s, images)."""
    import subprocess

    try:
        import tensorflow  # noqa: F401
    except ImportError:
        return None
    with Timer() as t:
        r = subprocess.run([sys.executable, "-c", KERAS_SCRIPT, str(data)], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"Keras script failed:\n{r.stderr[-2000:]}")
    return t.s, int(r.stdout.split()[0])


def command_targets(data: Path, tmp: Path, rounds: int = 1) -> dict:
    from retrain.architectures import get_backbone
    from retrain.features import features_onnx

    features_onnx(get_backbone("efficientnet_lite0"))  # one-time export, not part of a "cold" fit
    cache = tmp / "cli-cache"
    n = sum(1 for p in data.glob("*/*") if p.is_file())
    colds = []
    for i in range(rounds):  # the default, several times (median): each on an empty cache
        shutil.rmtree(cache, ignore_errors=True)
        colds.append(timed_cli("fit", data, "-o", tmp / "run", "--cache-dir", cache, "-q"))
    cold, cold_rss, r = sorted(colds, key=lambda t: t[0])[len(colds) // 2]
    cold_all = [t[0] for t in colds]
    cold32, _, r32 = timed_cli("fit", data, "-o", tmp / "run32", "--cache-dir", tmp / "cli-cache32", "-q",
                               "--bottleneck-precision", "fp32")
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
    import json

    precision = json.loads((tmp / "run" / "report.json").read_text())["bottleneck_precision"]
    return {"images": n, "precision": precision, "cold_s": cold, "cold_all": cold_all, "cold32_s": cold32, "summary32": r32.stdout.strip(),
            "cold8_s": cold8, "summary8": r8.stdout.strip(), "cold_rss_mb": cold_rss, "warm_s": warm,
            "warm_rss_mb": warm_rss, "label_one_s": label1, "label_folder_ips": 400 / lf,
            "summary": r.stdout.strip()}


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
    ap.add_argument("--rounds", type=int, default=3,
                    help="Keras varies from run to run: rounds of (retrain, Keras) extraction, and of the "
                         "Keras script, whose medians are compared")
    args = ap.parse_args()
    if not args.data.is_dir():
        raise SystemExit(f"data folder not found: {args.data}")
    tmp = Path(tempfile.mkdtemp(prefix="retrain-bench-"))
    try:
        files = pick(args.data, args.n)
        print(f"machine: {machine()}")
        from retrain.bottlenecks import choose_precision

        default = choose_precision("auto")
        ext = {}  # precision -> images/s of cold extraction
        for prec in dict.fromkeys([default, "fp32", "int8"]):
            ext[prec], timing, _ = bench_retrain(files, tmp, prec)
            print(f"retrain bottlenecks, {prec}{' (default)' if prec == default else ''}: "
                  f"{ext[prec]:7.1f} images/s   {timing}")
        t_ips = None if args.skip_torch else bench_torch(files)
        if t_ips:
            print(f"PyTorch eager, same backbone: {t_ips:7.1f} images/s   retrain is {ext[default] / t_ips:.2f}x")
        keras = keras_runner(files, tmp)
        rounds = []  # (retrain default, Keras) images/s, interleaved so both see the same machine
        if keras:
            for r in range(args.rounds):
                rounds.append((bench_retrain(files, tmp, default, tag=f"-round{r}")[0], keras()))
                print(f"round {r + 1}: retrain {default} {rounds[-1][0]:.1f} images/s, Keras steady state "
                      f"{rounds[-1][1]:.1f} images/s ({rounds[-1][0] / rounds[-1][1]:.2f}x)")
        else:
            print("Keras MobileNetV2 pipeline: skipped (TensorFlow not installed: pip install tensorflow-cpu)")
        r_ips = float(np.median([ext[default]] + [a for a, _ in rounds]))
        k_ips = float(np.median([b for _, b in rounds])) if rounds else None
        if k_ips:
            print(f"Keras steady state, median of {len(rounds)}: {k_ips:.1f} images/s (range "
                  f"{min(b for _, b in rounds):.1f}-{max(b for _, b in rounds):.1f}); retrain {default} median "
                  f"{r_ips:.1f}: {r_ips / k_ips:.2f}x")
        scripts = [keras_whole_process(args.data) for _ in range(args.rounds if keras else 0)]
        k_whole = float(np.median([n / w for w, n in scripts])) if scripts else None
        for w, n in scripts:
            print(f"Keras MobileNetV2 script, whole process over {n} photos: {w:.1f} s ({n / w:.1f} images/s)")
        c = command_targets(args.data, tmp, max(1, args.rounds))
        fits = [(f"`retrain fit` (default: {c['precision']}; median of "
                 f"{', '.join(f'{x:.1f}' for x in c['cold_all'])} s)", c["cold_s"], c["summary"]),
                ("`retrain fit --bottleneck-precision fp32`", c["cold32_s"], c["summary32"]),
                ("`retrain fit --bottleneck-precision int8`", c["cold8_s"], c["summary8"])]

        def vs(ips):
            return " / ".join(f"{ips / k:.2f}x {name}" for k, name in ((k_ips, "Keras steady state"),
                                                                        (k_whole, "Keras whole script")) if k)

        for name, wall, summary in fits:
            ips = c["images"] / wall
            print(f"cold {name}: {wall:.1f} s wall ({ips:.0f} images/s end to end){'; ' + vs(ips) if vs(ips) else ''}"
                  f"\n  {summary}")
        print(f"cold fit peak memory {c['cold_rss_mb']} MiB")
        print(f"warm fit (all cached, other L2): {c['warm_s']:.2f} s wall, peak {c['warm_rss_mb']} MiB")
        print(f"label one image from process start: {c['label_one_s']:.2f} s; label a folder: "
              f"{c['label_folder_ips']:.0f} images/s")
        rows = scaling(args.data, tmp, args.scaling_base) if args.scaling else []
        for r in rows:
            print(f"scaling: {r['images']:5d} images  {r['wall_s']:6.1f} s  {r['images'] / r['wall_s']:6.1f} images/s  "
                  f"peak {r['rss_mb']} MiB")
        if not args.no_append:
            engine = {"bf16": "OpenVINO, bf16", "fp32": "ONNX Runtime, fp32", "int8": "ONNX Runtime, int8"}
            lines = [f"Machine: {machine()}", "", f"Command: `python benchmarks/bench_fit.py"
                     f"{f' --rounds {args.rounds}' if args.rounds != 3 else ''}{' --scaling' if args.scaling else ''}` "
                     f"on {args.data.name}", "",
                     f"| bottleneck extraction ({len(files)} photos, cold, in one process) | images/s | "
                     f"retrain default is |", "|---|---:|---:|"]
            lines += [f"| retrain, {engine[p]}{' (default here; median of all its measurements)' if p == default else ''}"
                      f" | {r_ips if p == default else v:.1f} | {r_ips / (r_ips if p == default else v):.2f}x |"
                      for p, v in ext.items()]
            if t_ips:
                lines.append(f"| PyTorch eager, same EfficientNet-Lite0 | {t_ips:.1f} | {r_ips / t_ips:.2f}x |")
            lines.append(f"| Keras MobileNetV2 via image_dataset_from_directory, steady state, median of {len(rounds)} | "
                         + (f"{k_ips:.1f} | {r_ips / k_ips:.2f}x |" if k_ips else "not installed | - |"))
            if rounds:
                lines += ["", f"Interleaved rounds (retrain {default} on a fresh cache, then Keras; the retrain row "
                          f"above is the median of these and the first measurement, {ext[default]:.1f}):", "",
                          "| round | retrain images/s | Keras images/s | ratio |", "|---|---:|---:|---:|"]
                lines += [f"| {i + 1} | {a:.1f} | {b:.1f} | {a / b:.2f}x |" for i, (a, b) in enumerate(rounds)]
            lines += ["", "| whole command (fresh process) | wall | images/s | vs Keras steady state (median) | "
                      "vs Keras whole script (median) |", "|---|---:|---:|---:|---:|"]
            for w, n in scripts:
                lines.append(f"| Keras MobileNetV2 script over the folder ({n} photos) | {w:.1f} s | "
                             f"{n / w:.1f} | - | {n / w / k_whole:.2f}x |")
            for name, wall, _ in fits:
                ips = c["images"] / wall
                lines.append(f"| cold {name} | {wall:.1f} s | {ips:.0f} | "
                             f"{f'{ips / k_ips:.2f}x' if k_ips else '-'} | {f'{ips / k_whole:.2f}x' if k_whole else '-'} |")
            cold_ips = c["images"] / c["cold_s"]
            lines += ["", "| target | figure | target |", "|---|---:|---:|",
                      f"| cold `retrain fit` ({c['images']} photos, empty cache) | {c['cold_s']:.1f} s | <= 20 s |"]
            if k_whole:
                lines += [f"| cold `retrain fit` against the Keras pipeline, whole command against whole script "
                          f"(medians) | {cold_ips / k_whole:.2f}x | >= 3x |",
                          f"| cold `retrain fit` (whole command) against Keras steady-state extraction in process "
                          f"(median: no start-up and no training on its side) | {cold_ips / k_ips:.2f}x | >= 3x |"]
            lines += [f"| warm `retrain fit` (cached, other L2) | {c['warm_s']:.2f} s | <= 3 s |",
                      f"| `retrain label RUN one.jpg` from process start | {c['label_one_s']:.2f} s | <= 0.5 s |",
                      f"| `retrain label RUN folder/` (400 photos) | {c['label_folder_ips']:.0f} images/s | >= 100 |",
                      f"| peak memory of cold fit | {c['cold_rss_mb']} MiB | <= 1536 MiB |", ""]
            lines += [f"Fit summary, {name}: `{summary}`" + "\n" for name, _, summary in fits]
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
