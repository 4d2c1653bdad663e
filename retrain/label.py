"""`retrain label MODEL IMAGE|DIR ...`: top-k labels with scores, like the codelab's label_image.py.

Imports onnxruntime, numpy and Pillow only: starts in well under a second.
"""

from __future__ import annotations

import os
import sys

from retrain import callable_module
from retrain.errors import ConfigError, DataError, ImageError


def expand_inputs(inputs: list[str]) -> list[str]:
    """Files as given; folders expanded to the image files inside them (recursively, sorted)."""
    from retrain.images import is_image_name

    out = []
    for x in inputs:
        if os.path.isdir(x):
            found = []
            for dirpath, dirnames, filenames in os.walk(x):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                found += [os.path.join(dirpath, f) for f in sorted(filenames)
                          if not f.startswith(".") and is_image_name(f)]
            if not found:
                raise DataError(f"no images found in folder {x}")
            out += found
        elif os.path.isfile(x):
            out.append(x)
        else:
            raise DataError(f"image not found: {x}")
    return out


def label(model, inputs: list[str], *, top_k: int = 5, batch_size: int = 8, provider: str = "auto",
          tta: bool | None = None, quiet: bool = True, **overrides) -> list[dict]:
    """[{path, predictions: [{label, score}], label} or {path, error}] for each image (folders are
    expanded to the images inside them).

        >>> retrain.label("runs/flowers", ["daisy.jpg"])[0]["label"]
        'daisy'
    """
    from retrain.classifier import Classifier

    clf = Classifier(model, provider=provider, **overrides)
    return clf.classify(expand_inputs(inputs), top_k=top_k, batch_size=batch_size, tta=tta, quiet=quiet)


def add_arguments(p) -> None:
    from retrain.classifier import add_inference_arguments
    from retrain.config import bounded

    p.add_argument("model", nargs="?", help="run folder or model.onnx written by retrain fit")
    p.add_argument("inputs", nargs="*", metavar="IMAGE|DIR", help="images or folders of images")
    p.add_argument("--top-k", "--top_k", type=bounded(int, 1, 1000, "--top-k"), default=5, help="how many labels per image (default 5)")
    p.add_argument("--json", action="store_true", help="print JSON on stdout")
    add_inference_arguments(p)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    g = p.add_argument_group("label_image.py compatibility")
    g.add_argument("--graph", help="model file (same as MODEL)")
    g.add_argument("--labels", help="labels file, one per line (default: from the model)")
    g.add_argument("--image", action="append", default=[], help="image to label (repeatable)")
    g.add_argument("--input_layer", help="input name (default: from the model)")
    g.add_argument("--output_layer", help="output name (default: from the model)")
    g.add_argument("--input_height", type=bounded(int, 16, 4096, "--input_height"), help="input height (default: from the model)")
    g.add_argument("--input_width", type=bounded(int, 16, 4096, "--input_width"), help="input width (default: from the model)")
    g.add_argument("--input_mean", type=bounded(float, -1e4, 1e4, "--input_mean"), help="subtracted from pixels 0..255 (default: from the model)")
    g.add_argument("--input_std", type=bounded(float, 1e-6, 1e4, "--input_std"), help="pixels are divided by this (default: from the model)")


def main(args) -> int:
    from retrain.progress import print_json

    model = args.graph or args.model
    inputs = list(args.inputs) + list(args.image)
    if args.graph and args.model:
        inputs.insert(0, args.model)  # with --graph, the first positional is an image
    if not model:
        raise ConfigError("no model given: retrain label RUN_FOLDER IMAGE... (or --graph model.onnx --image x.jpg)")
    if not inputs:
        raise ConfigError("no images given: retrain label RUN_FOLDER IMAGE|DIR ...")
    if args.top_k < 1:
        raise ConfigError(f"--top-k must be at least 1, got {args.top_k}")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {args.batch_size}")
    for name in ("input_height", "input_width"):
        v = getattr(args, name)
        if v is not None and not 16 <= v <= 4096:
            raise ConfigError(f"--{name} must be between 16 and 4096, got {v}")
    if args.input_std is not None and args.input_std == 0:
        raise ConfigError("--input_std must not be 0")
    overrides = {k: getattr(args, k) for k in ("labels", "input_layer", "output_layer", "input_height",
                                               "input_width", "input_mean", "input_std")}
    results = label(model, inputs, top_k=args.top_k, batch_size=args.batch_size, provider=args.provider,
                    tta=args.tta, quiet=args.quiet or args.json or len(inputs) < 2, **overrides)
    failed = [r for r in results if "error" in r]
    if len(results) == 1 and failed:
        raise ImageError(f"{failed[0]['path']}: {failed[0]['error']}")
    if args.json:
        print_json(results)
    else:
        many = len(results) > 1
        for r in results:
            if "error" in r:
                continue
            if many:
                print(r["path"])
            for pr in r["predictions"]:
                print(f"{'  ' if many else ''}{pr['label']} (score={pr['score']:.5f})")
            if r["label"] == "unknown":
                print(f"{'  ' if many else ''}-> unknown (top score under the model's threshold)")
    for r in failed:
        print(f"skipped {r['path']}: {r['error']}", file=sys.stderr)
    return 1 if failed and len(failed) == len(results) else 0


callable_module(__name__, label)  # retrain.label(...) is label(...)
