"""Load a retrain model (a run folder or a model.onnx) and classify images with it.

Everything needed to use the model lives in the ONNX file's metadata (labels, input size,
mean, std, crop): a plain onnxruntime.InferenceSession plus that metadata is enough.
This module imports onnxruntime, numpy and Pillow only (never torch), so it starts fast.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from retrain import images
from retrain.errors import ModelError

MODEL_FILE = "model.onnx"
LABELS_FILE = "labels.txt"


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
        self.input_name = input_layer or self.meta.get("input_name") or ins[0].name
        self.output_name = output_layer or self.meta.get("output_name") or outs[0].name
        if self.input_name not in [i.name for i in ins]:
            raise ModelError(f"input '{self.input_name}' not in {self.path}; it has "
                             f"{', '.join(i.name for i in ins)}")
        if self.output_name not in [o.name for o in outs]:
            raise ModelError(f"output '{self.output_name}' not in {self.path}; it has "
                             f"{', '.join(o.name for o in outs)}")
        if labels:
            self.labels = read_labels(labels)
        elif "labels" in self.meta:
            self.labels = list(self.meta["labels"])
        else:
            raise ModelError(f"{self.path} has no retrain metadata (labels); pass --labels FILE "
                             "and the --input_* flags it was trained with")
        out_shape = [o for o in outs if o.name == self.output_name][0].shape
        width = out_shape[-1] if out_shape and isinstance(out_shape[-1], int) else None
        if width is not None and width != len(self.labels):
            raise ModelError(f"labels do not match the model: {len(self.labels)} labels"
                             f"{' in ' + str(labels) if labels else ''} but the model outputs {width} "
                             "classes; use the labels.txt written with this model")
        size = int(self.meta.get("input_size", 224))
        shape = [i for i in ins if i.name == self.input_name][0].shape
        if len(shape) == 4 and isinstance(shape[2], int) and "input_size" not in self.meta:
            size = shape[2]
        self.height = int(input_height or size)
        self.width = int(input_width or size)
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
        from retrain.bottlenecks import run_pipeline

        probs = np.full((len(sources), len(self.labels)), np.nan, np.float32)

        class _Session:  # adapts predict() to the pipeline's session.run interface
            def __init__(s):
                s.name = "input"

            def get_inputs(s):
                return [s]

            def run(s, _out, feed):
                return [self._predict_normalized(feed["input"], tta)]

        def on_batch(idx, out):
            probs[idx] = out

        errors, _ = run_pipeline(list(sources), self.load_image, _Session(), batch_size=batch_size,
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
