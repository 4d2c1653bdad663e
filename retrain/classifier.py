"""Classify photos with a retrain model (a run folder or a model.onnx): `Classifier`.

Used by `retrain label`, `evaluate`, `serve`, `export` and `bench`; reads the model's
metadata through retrain.model, so the preprocessing can never drift from training's.
Imports onnxruntime, numpy and Pillow only (never torch), so it starts fast.
"""

from __future__ import annotations

import os

import numpy as np

from retrain import images
from retrain.errors import ConfigError, ModelError
from retrain.model import read_metadata, resolve_model_path, validate_metadata


def read_labels(path) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


class Classifier:
    """An ONNX Runtime session plus the model's preprocessing.

        >>> clf = retrain.Classifier("runs/flowers")
        >>> clf.classify(["daisy.jpg"], top_k=2)[0]["predictions"]
        [{'label': 'daisy', 'score': 0.97}, {'label': 'tulips', 'score': 0.01}]

    Codelab-style overrides (labels file, input/output names, size, mean, std) replace what
    the metadata says; a model without retrain metadata needs at least `labels`.
    """

    def __init__(self, model, *, provider: str = "auto", threads: int | None = None, labels=None,
                 input_layer=None, output_layer=None, input_height=None, input_width=None,
                 input_mean=None, input_std=None, workers: int | None = None, cpu_threads: int | None = None):
        """cpu_threads: ONNX Runtime threads in place of `threads` where the model can only run
        on the CPU (retrain serve: one thread per call, one call per core)."""
        from retrain.runtime import make_session

        self.path = resolve_model_path(model)
        self.meta = read_metadata(self.path)
        self.session = make_session(self.path, provider=provider, threads=threads, cpu_threads=cpu_threads)
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
        if len(shape) == 4:  # a graph of a fixed size takes only that size
            for flag, given, fixed in (("--input_height", self.height, shape[2]), ("--input_width", self.width, shape[3])):
                if isinstance(fixed, int) and fixed > 0 and given != fixed:
                    raise ConfigError(f"{flag} {given}: {self.path} takes {shape[2]}x{shape[3]} images (its input "
                                      f"is fixed); give {fixed} or leave the flag out")
        self.mean = input_mean if input_mean is not None else self.meta.get("mean", 128.0)
        self.std = input_std if input_std is not None else self.meta.get("std", 128.0)
        self.crop_fraction = float(self.meta.get("crop_fraction", 0.875))
        self.unknown_threshold = self.meta.get("unknown_threshold")
        # The novelty output (retrain.novelty), where the model has one; a --output_layer override
        # or a graph without it means none.
        nov = self.meta.get("novelty_output")
        self.novelty_output = nov if nov in [o.name for o in outs] and nov != self.output_name else None
        self.novelty_threshold = self.meta.get("novelty_threshold") if self.novelty_output else None
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

    def predict_with_novelty(self, batch: np.ndarray, *, tta: bool = False):
        """uint8 (N, H, W, 3) -> (probabilities (N, K), novelty (N,) or None where the model has no
        novelty output). The novelty is the photo's own (never averaged with the mirror image:
        the threshold was chosen on unmirrored photos)."""
        return self._run(images.normalize(batch, self.mean, self.std), tta)

    def is_unknown(self, probs_row, novelty) -> bool:
        """Whether a photo is answered "unknown": novelty above the model's novelty threshold, or
        its top score under the model's unknown_threshold (fit --unknown-precision)."""
        if novelty is not None and self.novelty_threshold is not None and novelty > self.novelty_threshold:
            return True
        return self.unknown_threshold is not None and float(np.max(probs_row)) < self.unknown_threshold

    def classify_files(self, sources: list, *, batch_size: int = 8, quiet: bool = True,
                       tta: bool = False):
        """Probabilities for many files, decoded in threads while the model runs.

        Returns (probs (n, K) with NaN rows for failures, {index: reason}).
        """
        probs, _novelty, errors = self.score_files(sources, batch_size=batch_size, quiet=quiet, tta=tta)
        return probs, errors

    def score_files(self, sources: list, *, batch_size: int = 8, quiet: bool = True, tta: bool = False):
        """As classify_files, with the novelty: (probs (n, K), novelty (n,) or None where the model
        has no novelty output, {index: reason}); NaN rows for failures."""
        from retrain.pipeline import run_pipeline

        probs = np.full((len(sources), len(self.labels)), np.nan, np.float32)
        novelty = np.full(len(sources), np.nan, np.float32) if self.novelty_output else None

        def on_batch(idx, out):
            probs[idx] = out[0]
            if novelty is not None:
                novelty[idx] = out[1]

        errors, _ = run_pipeline(list(sources), self.load_image, lambda x: self._run(x, tta),
                                 batch_size=batch_size,
                                 workers=self.workers, mean=self.mean, std=self.std,
                                 on_batch=on_batch, desc="Labelling", quiet=quiet)
        return probs, novelty, errors

    def classify(self, sources: list, *, top_k: int = 5, batch_size: int = 8, tta: bool | None = None,
                 quiet: bool = True) -> list[dict]:
        """[{path, label, predictions: [{label, score}], novelty, unknown} or {path, error}] for each
        source (a path or bytes). `label` is "unknown" when the photo's novelty is above the
        model's novelty threshold, or its top score under the model's unknown_threshold; the
        best classes and their scores are given either way. `novelty` is None for a model
        without a novelty output. tta None: as the model says."""
        tta = self.tta_default if tta is None else tta
        probs, novelty, errors = self.score_files(sources, batch_size=batch_size, quiet=quiet, tta=tta)
        results = []
        for i, src in enumerate(sources):
            name = src if isinstance(src, (str, os.PathLike)) else f"<bytes {i}>"
            if i in errors:
                results.append({"path": name, "error": errors[i]})
                continue
            results.append({"path": name, **self.answer(probs[i], None if novelty is None else novelty[i], top_k)})
        return results

    def answer(self, p: np.ndarray, novelty=None, k: int = 5) -> dict:
        """One photo's answer from its probabilities and novelty: {label, predictions, novelty, unknown}."""
        preds = self.top_k(p, k)
        nov = None if novelty is None else round(float(novelty), 6)
        unknown = self.is_unknown(p, nov)
        return {"label": "unknown" if unknown else preds[0]["label"], "predictions": preds, "novelty": nov,
                "unknown": unknown}

    def _predict_normalized(self, x: np.ndarray, tta: bool) -> np.ndarray:
        p = self.session.run([self.output_name], {self.input_name: x})[0]
        if tta:
            p = (p + self.session.run([self.output_name], {self.input_name: x[..., ::-1].copy()})[0]) / 2
        return p

    def _run(self, x: np.ndarray, tta: bool):
        """(probabilities, novelty or None) of normalised (N, 3, H, W) input, in one model call."""
        if not self.novelty_output:
            return self._predict_normalized(x, tta), None
        p, nov = self.session.run([self.output_name, self.novelty_output], {self.input_name: x})
        if tta:
            p = (p + self.session.run([self.output_name], {self.input_name: x[..., ::-1].copy()})[0]) / 2
        return p, nov

    def top_k(self, p: np.ndarray, k: int = 5) -> list[dict]:
        order = np.argsort(-p)[: min(k, len(self.labels))]
        return [{"label": self.labels[i], "score": round(float(p[i]), 6)} for i in order]

    def describe(self) -> dict:
        """Model facts for people and for the server's /v1/model."""
        keep = ("architecture", "metrics", "retrain_version", "created", "tta", "unknown_threshold",
                "temperature", "format", "novelty_output", "novelty_method", "novelty_threshold",
                "unknown_coverage")
        return {"path": str(self.path), "labels": self.labels, "input_name": self.input_name,
                "output_name": self.output_name, "input_size": [self.height, self.width],
                "mean": self.mean, "std": self.std, "crop_fraction": self.crop_fraction,
                **{k: self.meta[k] for k in keep if k in self.meta}}


def add_inference_arguments(p) -> None:
    """The flags of every command that runs a model on photos (label, evaluate)."""
    from retrain.config import bounded

    p.add_argument("--batch-size", type=bounded(int, 1, 1024, "--batch-size"), default=8,
                   help="images per batch (default 8: fastest on a CPU)")
    p.add_argument("--provider", default="auto", help="auto, cpu, cuda or tensorrt")
    p.add_argument("--tta", action="store_true", default=None,
                   help="test-time augmentation: average with the mirror image (default: as the model says)")
    p.add_argument("--no-tta", dest="tta", action="store_false", help="no test-time augmentation")
