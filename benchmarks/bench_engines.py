"""Where bottleneck time goes: each engine's inference alone, and decoding alone, in one process.

    python benchmarks/bench_engines.py [--data ../shared/data/flower_photos] [--no-append]

Inference alone: EfficientNet-Lite0 features on the same decoded photos, batch 8, all cores,
for ONNX Runtime fp32 and int8 and (where the CPU has bf16 units and OpenVINO is installed)
OpenVINO bf16, fed uint8 pixels with the normalisation compiled into the model, as retrain
runs it (a static batch of 8 on throughput streams, batches in flight together), then set up
as the previous version did (dynamic batch, one request at a time). Decoding alone: retrain.images.load (JPEG decode + centre crop + bicubic resize) on
one thread. A pipeline that overlaps both on the same cores can at best reach
1 / (decode core-seconds per image + inference core-seconds per image) * cores.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import FLOWERS, ROOT, append_markdown, machine  # noqa: E402


def rate(fn, n_per_call: int, seconds: float = 4.0) -> float:
    fn()  # warm-up
    n, t = 0, time.perf_counter()
    while time.perf_counter() - t < seconds:
        fn()
        n += n_per_call
    return n / (time.perf_counter() - t)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=FLOWERS)
    ap.add_argument("--no-append", action="store_true")
    args = ap.parse_args()
    from retrain import images
    from retrain.architectures import get_backbone
    from retrain.bottlenecks import choose_precision, feature_session

    bb = get_backbone("efficientnet_lite0")
    files = sorted(p for p in args.data.glob("*/*.jpg"))[::10]
    for p in files:
        p.read_bytes()  # page cache: time the decoding, not the disk

    def decode_all():
        for p in files:
            images.load(str(p), bb.image_size, bb.crop_fraction)

    dec = rate(decode_all, len(files))
    print(f"decode + crop + resize, one thread: {dec:.0f} images/s ({1e3 / dec:.2f} ms per image)")
    u8 = np.stack([images.load(str(p), bb.image_size, bb.crop_fraction) for p in files[:64]])
    x32 = images.normalize(u8, bb.mean, bb.std)
    rows = []
    precs = ["fp32", "int8"] + (["bf16"] if choose_precision("auto") == "bf16" else [])
    for prec in precs:
        s = feature_session(bb, precision=prec)
        x = u8 if getattr(s, "takes_uint8", False) else x32
        # ONNX Runtime: one batch of 8 at a time on all cores. OpenVINO: batches of 8 on its
        # throughput streams, all in flight at once (what run() does with 64 images).
        batches = [x] if hasattr(s, "submit") else [x[i:i + 8] for i in range(0, 64, 8)]

        def run():
            for b in batches:
                s(b)

        r = rate(run, 64)
        engine = "OpenVINO" if prec == "bf16" else "ONNX Runtime"
        bound = os.cpu_count() / (1 / dec + os.cpu_count() / r)
        rows.append((f"{engine} {prec}", r, bound))
        print(f"{engine} {prec} inference alone ({os.cpu_count()} threads): {r:.0f} images/s; "
              f"pipeline bound with decoding: {bound:.0f} images/s")
    if "bf16" in precs:
        # The same engine set up as before this version: a dynamic batch and one request at a
        # time using every core (LATENCY), fed uint8 (normalised in the model) or float NCHW.
        import openvino as ov
        from openvino.preprocess import PrePostProcessor

        from retrain.features import features_onnx

        core = ov.Core()
        for name, raw in (("uint8 input", True), ("float NCHW input (normalised in numpy, not counted)", False)):
            m = core.read_model(str(features_onnx(bb)))
            m.reshape([-1, 3, bb.image_size, bb.image_size])
            if raw:
                ppp = PrePostProcessor(m)
                ppp.input().tensor().set_element_type(ov.Type.u8).set_layout(ov.Layout("NHWC"))
                ppp.input().model().set_layout(ov.Layout("NCHW"))
                ppp.input().preprocess().convert_element_type(ov.Type.f32).mean([float(bb.mean)] * 3) \
                    .scale([float(bb.std)] * 3)
                m = ppp.build()
            req = core.compile_model(m, "CPU", {"INFERENCE_PRECISION_HINT": "bf16", "PERFORMANCE_HINT": "LATENCY",
                                                "INFERENCE_NUM_THREADS": os.cpu_count()}).create_infer_request()
            fb = [(u8 if raw else x32)[i:i + 8] for i in range(0, 64, 8)]

            def run_one_at_a_time():
                for b in fb:
                    req.infer({0: b})

            r = rate(run_one_at_a_time, 64)
            bound = os.cpu_count() / (1 / dec + os.cpu_count() / r)
            rows.append((f"OpenVINO bf16, dynamic batch, one request at a time, {name}", r, bound))
            print(f"OpenVINO bf16, dynamic batch, one request at a time, {name}: {r:.0f} images/s")
    if not args.no_append:
        body = "\n".join([
            f"Machine: {machine()}", "", "Command: `python benchmarks/bench_engines.py`", "",
            f"Decode + crop + resize (Pillow, one thread): {dec:.0f} images/s ({1e3 / dec:.2f} ms per image).", "",
            "| engine | inference alone, images/s (batches of 8, all cores) | bound for a pipeline that also decodes |",
            "|---|---:|---:|",
            *[f"| {n} | {r:.0f} | {b:.0f} |" for n, r, b in rows]])
        append_markdown(ROOT / "BENCHMARKS.md", "Engines and decoding, each alone (issue 6)", body)


if __name__ == "__main__":
    main()
