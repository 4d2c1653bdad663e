"""The model file: one self-contained model.onnx, and the one place that writes, reads and
checks its metadata.

The graph: input `input` (N, 3, H, W) float32, (pixel - mean) / std in 0..255 units -> the
backbone's pooled features -> MatMul W -> Add b -> / temperature -> Softmax -> `final_result`
(N, K) probabilities; unless `fit --no-unknown`, a second output `novelty` (N,) computed from the same
features (retrain.novelty). The metadata (METADATA) carries everything needed to use it, so a plain
onnxruntime.InferenceSession plus the metadata is enough (README: "Using the model without
retrain"). Built with the onnx library from the cached backbone graph: no torch needed. The
written model is re-run and compared with the trained head before it is declared written.
This module imports onnxruntime, numpy and onnx only (never torch).
"""


from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import numpy as np

from retrain import __version__
from retrain.config import MEAN_RANGE, STD_RANGE
from retrain.errors import ModelError
from retrain.files import save_onnx_atomic
from retrain.run import MODEL as MODEL_FILE

INPUT_SIZES = (16, 4096)  # pixels, as for --input_height / --input_width
# The metadata keys retrain writes (model_metadata) and checks on load (validate_metadata).
METADATA = {
    "retrain_version": "the retrain that wrote the model",
    "labels": "JSON list of the class names, in output order",
    "architecture": "the backbone",
    "input_name": "the graph's input", "output_name": "the graph's output (probabilities)",
    "input_size": "side of the square input, pixels", "mean": "subtracted from 0..255 pixels",
    "std": "pixels are then divided by this", "crop_fraction": "centre crop of the short side",
    "preprocessing": "the above in words", "metrics": "train/validation/test accuracy at export",
    "created": "UTC time", "format": "onnx, onnx-int8 or onnx-fp16",
    "temperature": "folded into the head", "unknown_threshold": "top score under which to answer unknown",
    "tta": "average with the mirror image by default", "fine_tuned": "the backbone's tail was trained",
    "optimizer": "how the head was trained", "backbone_precision": "fp32 or int8 backbone graph",
    "bottleneck_precision": "the precision the head was trained on",
    "novelty_output": "the graph's second output: how unlike the training photos each photo is (N,)",
    "novelty_method": "how the novelty is computed, in words (retrain.novelty)",
    "novelty_threshold": "novelty above which to answer unknown (none: never)",
    "unknown_coverage": "share of in-distribution photos the novelty threshold keeps",
}


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
    if has("novelty_threshold") and meta["novelty_threshold"] is not None \
            and not _finite(meta["novelty_threshold"], 0, 2):
        bad("novelty_threshold", "a novelty from 0 to 2 (or no threshold)")
    if has("unknown_coverage") and not (_finite(meta["unknown_coverage"]) and 0 < meta["unknown_coverage"] <= 1):
        bad("unknown_coverage", "a share above 0 and at most 1")
    if has("temperature") and not (_finite(meta["temperature"]) and meta["temperature"] > 0):
        bad("temperature", "a positive number")
    if has("tta") and not isinstance(meta["tta"], bool):
        bad("tta", "true or false")
    for key in ("input_name", "output_name", "novelty_output"):
        if has(key) and not (isinstance(meta[key], str) and meta[key]):
            bad(key, "the name of one of the model's tensors")


def attach_head(backbone_onnx, W: np.ndarray, b: np.ndarray, *, output_name: str = "final_result",
                temperature: float = 1.0, novelty=None):
    """Backbone features (N, C) -> MatMul W (C, K) -> Add b -> /T -> Softmax -> output_name; with
    `novelty` (a retrain.novelty.Novelty) a second output, its score (N,) from the same features."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    m = onnx.load(str(backbone_onnx))
    g = m.graph
    feat = g.output[0].name
    W = np.asarray(W, np.float32) / np.float32(temperature)
    b = np.asarray(b, np.float32) / np.float32(temperature)
    g.initializer.extend([numpy_helper.from_array(W, "head_weight"),
                          numpy_helper.from_array(b, "head_bias")])
    g.node.extend([
        helper.make_node("MatMul", [feat, "head_weight"], ["head_matmul"], name="head_matmul"),
        helper.make_node("Add", ["head_matmul", "head_bias"], ["logits"], name="head_add"),
        helper.make_node("Softmax", ["logits"], [output_name], name="final_softmax", axis=-1),
    ])
    del g.output[:]
    g.output.extend([helper.make_tensor_value_info(output_name, TensorProto.FLOAT, ["N", W.shape[1]])])
    if novelty is not None:
        from retrain.novelty import onnx_nodes

        opset = max((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), default=13)
        nodes, inits, out = onnx_nodes(novelty, feat, opset, novelty_output_name(output_name))
        g.initializer.extend(inits)
        g.node.extend(nodes)
        g.output.extend([out])
    return m


def novelty_output_name(output_name: str) -> str:
    """The novelty output's name: "novelty", unless the probabilities took it."""
    from retrain.novelty import OUTPUT

    return OUTPUT if output_name != OUTPUT else OUTPUT + "_score"


def set_metadata(m, meta: dict) -> None:
    """Store metadata as strings (JSON for non-strings) in metadata_props."""
    del m.metadata_props[:]
    for k, v in meta.items():
        e = m.metadata_props.add()
        e.key = k
        e.value = v if isinstance(v, str) else json.dumps(v)


def model_metadata(*, labels, backbone, metrics, output_name, extra=None) -> dict:
    import datetime

    pre = backbone.preprocessing()
    meta = {
        "retrain_version": __version__,
        "labels": list(labels),
        "architecture": backbone.name,
        "input_name": "input",
        "output_name": output_name,
        "input_size": pre["size"],
        "mean": pre["mean"],
        "std": pre["std"],
        "crop_fraction": pre["crop_fraction"],
        "preprocessing": (f"RGB, centre crop {pre['crop_fraction']:.4f} of the short side, bicubic resize "
                          f"to {pre['size']}x{pre['size']}, (pixel - {pre['mean']}) / {pre['std']}, NCHW float32"),
        "metrics": metrics,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "format": "onnx",
    }
    meta.update(extra or {})
    return meta


def verify(model_path, x_uint8: np.ndarray, expected: np.ndarray, expected_novelty=None, *,
           tol: float = 2e-3) -> float:
    """Run the written model as a user outside retrain would (a plain InferenceSession, the
    preprocessing its metadata states) and compare with `expected` probabilities (and the
    novelty output with `expected_novelty`, where given)."""
    from retrain.images import normalize
    from retrain.runtime import make_session

    if not len(expected):
        return 0.0
    meta = read_metadata(model_path)
    validate_metadata(meta, where=model_path)
    sess = make_session(model_path, provider="cpu")
    x = normalize(x_uint8, meta["mean"], meta["std"])
    names = [meta["output_name"]] + ([meta["novelty_output"]] if expected_novelty is not None else [])
    got = sess.run(names, {meta["input_name"]: x})
    diff = float(np.abs(got[0] - expected).max())
    if diff > tol:
        raise ModelError(f"exported model disagrees with the trained head (max prob diff {diff:.2e} > {tol})")
    if expected_novelty is not None:
        nd = float(np.abs(got[1] - np.asarray(expected_novelty)).max())
        if nd > tol:
            raise ModelError(f"exported model's novelty disagrees with the fitted score (max diff {nd:.2e} > {tol})")
    return diff


def write_model(path: Path, backbone, W, b, *, labels, metrics, output_name="final_result",
                extra_meta=None, temperature: float = 1.0, check=None, precision: str = "fp32",
                fine_tuned=None, novelty=None) -> float:
    """Build, save and verify model.onnx: the backbone graph (of the bottlenecks' precision, or
    the fine-tuned one: a retrain.finetune.FineTuneResult) + the head (+ the novelty output:
    a retrain.novelty.Novelty, its keys in the metadata).

    `check` = (uint8 images, expected probs[, expected novelty]). Returns the max probability difference.
    """
    import onnx

    extra = dict(extra_meta or {})
    with tempfile.TemporaryDirectory(dir=Path(path).parent, prefix=".graph-") as tmp:
        if fine_tuned is not None:
            from retrain.backbone_split import fine_tuned_features_onnx

            graph = Path(tmp) / "features.onnx"
            fine_tuned_features_onnx(backbone, fine_tuned, graph)
        else:
            from retrain.features import features_onnx

            # bf16 bottlenecks come from the fp32 graph run in bf16 (OpenVINO): the model keeps it in fp32.
            kind = "int8" if precision == "int8" else "fp32"
            graph = features_onnx(backbone, precision=kind)
            extra = {"backbone_precision": kind, "bottleneck_precision": precision, **extra}
        m = attach_head(graph, W, b, output_name=output_name, temperature=temperature, novelty=novelty)
    if novelty is not None:
        extra = {**extra, **novelty.metadata(), "novelty_output": novelty_output_name(output_name)}
    set_metadata(m, model_metadata(labels=labels, backbone=backbone, metrics=metrics, output_name=output_name,
                                   extra=extra))
    onnx.checker.check_model(m)
    save_onnx_atomic(m, Path(path))
    return verify(path, *check) if check is not None else 0.0
