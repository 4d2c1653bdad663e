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


def manifest_inputs(inputs: list[str]) -> list[str]:
    """Photos of DIR|MANIFEST|IMAGE arguments: folders expanded (as retrain label does), a text
    file of paths (one per line, # comments) read."""
    from retrain.images import is_image_name

    out = []
    for x in inputs:
        if os.path.isfile(x) and not is_image_name(x):
            with open(x, encoding="utf-8", errors="surrogateescape") as f:
                out += [os.path.abspath(line.strip()) for line in f if line.strip() and not line.startswith("#")]
        else:
            out += [os.path.abspath(p) for p in expand_inputs([x])]
    if not out:
        raise DataError("no images given")
    return list(dict.fromkeys(out))


def label(model, inputs: list[str], *, top_k: int = 5, batch_size: int = 8, provider: str = "auto",
          tta: bool | None = None, quiet: bool = True, **overrides) -> list[dict]:
    """[{path, predictions: [{label, score}], label, novelty, unknown} or {path, error}] for each image
    (folders are expanded to the images inside them); see Classifier.classify.

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
    g = p.add_argument_group("many photos: predictions to Parquet, resumable, optionally on a Ray cluster")
    g.add_argument("--out", metavar="PREDS", help="write path, label, score, unknown, top-k and error per photo to "
                   "this folder (Parquet); photos already in it are skipped. IMAGE|DIR may also be a text file "
                   "of paths, one per line")
    g.add_argument("--ray", metavar="ADDRESS", help="label on the Ray cluster at ADDRESS (needs retrain[ray] "
                   "and --out); the model is sent to every node")
    g.add_argument("--actors", type=bounded(int, 1, 100_000, "--actors"), default=None,
                   help="with --ray: labelling actors (default: as many as the CPUs allow)")
    g.add_argument("--actor-cpus", type=bounded(float, 0.25, 512, "--actor-cpus"), default=1.0,
                   help="with --ray: CPUs (threads) of each actor (default 1)")
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
    from retrain.progress import Log, print_json

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
    if args.ray and not args.out:
        raise ConfigError("--ray writes its predictions to Parquet: add --out PREDS (a folder)")
    if args.out:
        from retrain.distributed import label_to_store

        r = label_to_store(model, manifest_inputs(inputs), args.out, address=args.ray, top_k=args.top_k,
                           batch_size=args.batch_size, tta=args.tta, actors=args.actors, actor_cpus=args.actor_cpus,
                           quiet=args.quiet or args.json, log=Log(args.quiet or args.json))
        if args.json:
            print_json(r)
        else:
            print(f"retrain label: {r['photos']} photos, {r['labelled']} labelled in {r['seconds']:.1f} s, "
                  f"{r['already']} already in {r['out']} ({r['rows']} rows)")
        return 0
    overrides = {k: getattr(args, k) for k in ("labels", "input_layer", "output_layer", "input_height",
                                               "input_width", "input_mean", "input_std")}
    from retrain.classifier import Classifier

    clf = Classifier(model, provider=args.provider, **overrides)  # as label() does, kept for the "unknown" line
    results = clf.classify(expand_inputs(inputs), top_k=args.top_k, batch_size=args.batch_size, tta=args.tta,
                           quiet=args.quiet or args.json or len(inputs) < 2)
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
                print(f"{'  ' if many else ''}-> unknown ({unknown_reason(r, clf)})")
    for r in failed:
        print(f"skipped {r['path']}: {r['error']}", file=sys.stderr)
    return 1 if failed and len(failed) == len(results) else 0


def unknown_reason(r: dict, clf) -> str:
    """Why a photo was answered unknown, in words (clf: the Classifier that answered)."""
    thr = clf.novelty_threshold
    if r.get("novelty") is not None and thr is not None and r["novelty"] > thr:
        return (f"novelty {r['novelty']:.3f} above the model's threshold {thr:.3f}: unlike the photos it was "
                "trained on")
    return "top score under the model's threshold"


callable_module(__name__, label)  # retrain.label(...) is label(...)
