"""Load a retrain model (a run folder or a model.onnx) and classify images with it.

Everything needed to use the model lives in the ONNX file's metadata (labels, input size,
mean, std, crop): a plain onnxruntime.InferenceSession plus that metadata is enough.
This module imports onnxruntime, numpy and Pillow only (never torch), so it starts fast.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np

from retrain import images
from retrain.errors import ModelError

MODEL_FILE = "model.onnx"
LABELS_FILE = "labels.txt"
INPUT_SIZES = (16, 4096)  # pixels, as for --input_height / --input_width
MEAN_RANGE = (-1e4, 1e4)  # as for --input_mean
STD_RANGE = (1e-6, 1e4)  # as for --input_std


def resolve_model_path(model) -> Path:
    """A run folder (holding model.onnx) or an .onnx file -> the .onnx path."""
    p = Path(model).expanduser()
    if p.is_dir():
        if (p / MODEL_FILE).is_file():
            return p / MODEL_FILE
        raise ModelError(f"{p} is not a retrain run folder: it has no {MODEL_FILE} "
                         "(train one with `retrain fit IMAGE_DIR --output RUN`)")
    if p.is_file():
        return p
    raise ModelError(f"model not found: {p} (give a run folder written by `retrain fit` or a .onnx file)")


def read_metadata(path) -> dict:
    """The model's metadata as Python values (JSON strings decoded)."""
    import onnxruntime as ort

    path = resolve_model_path(path)
    with open(path, "rb") as f:
        head = f.read(64)
    if not head or head[:1] not in (b"\x08", b"\x12", b"\x1a", b"\x22", b"\x3a", b"\x42", b"\x52"):
        raise ModelError(f"{path} is not an ONNX model (it starts with {head[:8]!r}); "
                         "give a run folder or model.onnx written by `retrain fit`")
    try:
        so = ort.SessionOptions()
        so.log_severity_level = 3
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise ModelError(f"{path} is not a usable ONNX model ({str(e).splitlines()[0][:160]})") from None
    raw = sess.get_modelmeta().custom_metadata_map
    return decode_metadata(raw)


def decode_metadata(raw: dict) -> dict:
    out = {}
    for k, v in raw.items():
        try:
            out[k] = json.loads(v)
        except (TypeError, ValueError):
            out[k] = v
    return out


def _shown(v) -> str:
    """A metadata value as the error message shows it (quoted, cut to a readable length)."""
    try:
        text = f"'{v}'" if isinstance(v, str) else json.dumps(v)
    except (TypeError, ValueError):
        text = repr(v)
    text = text.replace("\n", " ")
    return text if len(text) <= 60 else text[:57] + "..."


def _finite(v, lo=-math.inf, hi=math.inf) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and lo <= v <= hi


def validate_metadata(meta: dict, input_shape=None, output_width=None, *, where="model.onnx",
                      ignore=()) -> None:
    """Check every metadata value the Classifier uses; raise one ModelError naming the key.

    input_shape: the graph input's shape (its H and W checked when they are fixed numbers);
    output_width: the number of classes the graph outputs (None where it is not fixed);
    ignore: keys replaced by an override (a --labels file, --input_mean, ...), not checked.
    A missing key is fine (the defaults apply); a present one must make sense.
    """
    redo = "re-export the model with `retrain fit`"

    def has(key):
        return key in meta and key not in ignore

    def bad(key, expected):
        raise ModelError(f"{where}: metadata '{key}' is {_shown(meta[key])}; expected {expected}: {redo}")

    if has("labels"):
        labels = meta["labels"]
        if not (isinstance(labels, list) and labels and all(isinstance(x, str) and x.strip() for x in labels)):
            bad("labels", "a list of class names (non-empty strings)")
        if output_width is not None and len(labels) != output_width:
            raise ModelError(f"{where}: metadata 'labels' has {len(labels)} class names but the model outputs "
                             f"{output_width} classes: {redo}")
    if has("input_size"):
        v = meta["input_size"]
        lo, hi = INPUT_SIZES
        if not (isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi):
            bad("input_size", f"a whole number of pixels ({lo} to {hi})")
        hw = list(input_shape[2:4]) if input_shape is not None and len(input_shape) == 4 else []
        fixed = [d for d in hw if isinstance(d, int) and d > 0]
        if any(d != v for d in fixed):
            bad("input_size", f"{'x'.join(map(str, hw))}, the size of the model's input")
    for key, (lo, hi) in (("mean", MEAN_RANGE), ("std", STD_RANGE)):
        if has(key):
            v = meta[key]
            values = v if isinstance(v, list) and len(v) in (1, 3) else [v]
            if not all(_finite(x, lo, hi) for x in values):
                bad(key, f"a number from {lo:g} to {hi:g}, or a list of 3 (one per channel R, G, B)")
    if has("crop_fraction") and not (_finite(meta["crop_fraction"]) and 0 < meta["crop_fraction"] <= 1):
        bad("crop_fraction", "a fraction of the short side above 0 and at most 1")
    if has("unknown_threshold") and meta["unknown_threshold"] is not None \
            and not _finite(meta["unknown_threshold"], 0, 1):
        bad("unknown_threshold", "a score from 0 to 1 (or no threshold)")
    if has("temperature") and not (_finite(meta["temperature"]) and meta["temperature"] > 0):
        bad("temperature", "a positive number")
    if has("tta") and not isinstance(meta["tta"], bool):
        bad("tta", "true or false")
    for key in ("input_name", "output_name"):
        if has(key) and not (isinstance(meta[key], str) and meta[key]):
            bad(key, "the name of one of the model's tensors")


def read_labels(path) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


class Classifier:
    """An ONNX Runtime session plus the model's preprocessing.

    Codelab-style overrides (labels file, input/output names, size, mean, std) replace what
    the metadata says; a model without retrain metadata needs at least `labels`.
    """

    def __init__(self, model, *, provider: str = "auto", threads: int | None = None, labels=None,
                 input_layer=None, output_layer=None, input_height=None, input_width=None,
                 input_mean=None, input_std=None, workers: int | None = None):
        from retrain.runtime import make_session

        self.path = resolve_model_path(model)
        self.meta = read_metadata(self.path)
        self.session = make_session(self.path, provider=provider, threads=threads)
        ins, outs = self.session.get_inputs(), self.session.get_outputs()
        overridden = {"labels": labels, "input_name": input_layer, "output_name": output_layer,
                      "mean": input_mean, "std": input_std,
                      "input_size": input_height if input_width is not None else None}
        ignore = [k for k, v in overridden.items() if v is not None and v != ""]
        self.input_name = input_layer or self.meta.get("input_name") or ins[0].name
        self.output_name = output_layer or self.meta.get("output_name") or outs[0].name
        names = {k: self.meta[k] for k in ("input_name", "output_name") if k in self.meta}
        validate_metadata(names, where=self.path, ignore=ignore)  # before they are looked up in the graph
        if self.input_name not in [i.name for i in ins]:
            raise ModelError(f"input '{self.input_name}' not in {self.path}; it has "
                             f"{', '.join(i.name for i in ins)}")
        if self.output_name not in [o.name for o in outs]:
            raise ModelError(f"output '{self.output_name}' not in {self.path}; it has "
                             f"{', '.join(o.name for o in outs)}")
        out_shape = next(o for o in outs if o.name == self.output_name).shape
        n_out = out_shape[-1] if out_shape and isinstance(out_shape[-1], int) else None
        shape = next(i for i in ins if i.name == self.input_name).shape
        validate_metadata(self.meta, shape, n_out, where=self.path, ignore=ignore)
        if labels:
            self.labels = read_labels(labels)
        elif "labels" in self.meta:
            self.labels = list(self.meta["labels"])
        else:
            raise ModelError(f"{self.path} has no retrain metadata (labels); pass --labels FILE "
                             "and the --input_* flags it was trained with")
        if n_out is not None and n_out != len(self.labels):
            raise ModelError(f"labels do not match the model: {len(self.labels)} labels"
                             f"{' in ' + str(labels) if labels else ''} but the model outputs {n_out} "
                             "classes; use the labels.txt written with this model")
        if "input_size" in self.meta and "input_size" not in ignore:
            height = width = int(self.meta["input_size"])  # checked above
        else:
            height = width = 224
            if len(shape) == 4:  # a model without retrain metadata: the graph's size where fixed
                height = shape[2] if isinstance(shape[2], int) and shape[2] > 0 else height
                width = shape[3] if isinstance(shape[3], int) and shape[3] > 0 else width
        self.height = int(input_height or height)
        self.width = int(input_width or width)
        self.mean = input_mean if input_mean is not None else self.meta.get("mean", 128.0)
        self.std = input_std if input_std is not None else self.meta.get("std", 128.0)
        self.crop_fraction = float(self.meta.get("crop_fraction", 0.875))
        self.unknown_threshold = self.meta.get("unknown_threshold")
        self.workers = workers or min(4, os.cpu_count() or 1)

    @property
    def tta_default(self) -> bool:
        return bool(self.meta.get("tta", False))

    def load_image(self, source) -> np.ndarray:
        """Path or bytes -> uint8 (H, W, 3) with this model's preprocessing. Raises ImageError."""
        return images.load(source, (self.width, self.height), self.crop_fraction)

    def predict(self, batch: np.ndarray, *, tta: bool = False) -> np.ndarray:
        """uint8 (N, H, W, 3) -> probabilities (N, K). With tta, averages with the mirror image."""
        return self._predict_normalized(images.normalize(batch, self.mean, self.std), tta)

    def classify_files(self, sources: list, *, batch_size: int = 8, quiet: bool = True,
                       tta: bool = False):
        """Probabilities for many files, decoded in threads while the model runs.

        Returns (probs (n, K) with NaN rows for failures, {index: reason}).
        """
        from retrain.pipeline import run_pipeline

        probs = np.full((len(sources), len(self.labels)), np.nan, np.float32)

        def on_batch(idx, out):
            probs[idx] = out

        errors, _ = run_pipeline(list(sources), self.load_image, lambda x: self._predict_normalized(x, tta),
                                 batch_size=batch_size,
                                 workers=self.workers, mean=self.mean, std=self.std,
                                 on_batch=on_batch, desc="Labelling", quiet=quiet)
        return probs, errors

    def _predict_normalized(self, x: np.ndarray, tta: bool) -> np.ndarray:
        p = self.session.run([self.output_name], {self.input_name: x})[0]
        if tta:
            p = (p + self.session.run([self.output_name], {self.input_name: x[..., ::-1].copy()})[0]) / 2
        return p

    def top_k(self, p: np.ndarray, k: int = 5) -> list[dict]:
        order = np.argsort(-p)[: min(k, len(self.labels))]
        return [{"label": self.labels[i], "score": round(float(p[i]), 6)} for i in order]

    def describe(self) -> dict:
        """Model facts for people and for the server's /v1/model."""
        keep = ("architecture", "metrics", "retrain_version", "created", "tta", "unknown_threshold",
                "temperature", "format")
        return {"path": str(self.path), "labels": self.labels, "input_name": self.input_name,
                "output_name": self.output_name, "input_size": [self.height, self.width],
                "mean": self.mean, "std": self.std, "crop_fraction": self.crop_fraction,
                **{k: self.meta[k] for k in keep if k in self.meta}}
