"""Write the self-contained model: backbone graph + final layer + softmax in one ONNX file.

Input `input` (N, 3, H, W) float32, (pixel - mean) / std in 0..255 units; output
`final_result` (N, K) probabilities. The metadata carries everything needed to use it.
Built with the onnx library from the cached backbone graph: no torch needed.
The written model is re-run and compared with the source before it is declared written.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np

from retrain import __version__


def attach_head(backbone_onnx, W: np.ndarray, b: np.ndarray, *, output_name: str = "final_result",
                temperature: float = 1.0):
    """Backbone features (N, C) -> MatMul W (C, K) -> Add b -> /T -> Softmax -> output_name."""
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
    return m


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


def save_atomic(m, path: Path) -> None:
    import onnx

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".onnx")
    os.close(fd)
    try:
        onnx.save(m, tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a model is meant to be shared
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def verify(model_path, x_uint8: np.ndarray, expected: np.ndarray, *, tol: float = 2e-3) -> float:
    """Run the written model with a plain InferenceSession and compare with `expected` probs."""
    from retrain.errors import ModelError
    from retrain.model import Classifier

    clf = Classifier(model_path, provider="cpu")
    got = clf.predict(x_uint8)
    diff = float(np.abs(got - expected).max()) if len(expected) else 0.0
    if diff > tol:
        raise ModelError(f"exported model disagrees with the trained head (max prob diff {diff:.2e} > {tol})")
    return diff


def write_model(path: Path, backbone, W, b, *, labels, metrics, output_name="final_result",
                extra_meta=None, temperature: float = 1.0, check=None, precision: str = "fp32") -> float:
    """Build, save and verify model.onnx on the backbone graph of the bottlenecks' precision.

    `check` = (uint8 images, expected probs). Returns the max probability difference.
    """
    from retrain.backbones import features_onnx

    # bf16 bottlenecks come from the fp32 graph run in bf16 (OpenVINO): the model keeps it in fp32.
    graph = "int8" if precision == "int8" else "fp32"
    m = attach_head(features_onnx(backbone, precision=graph), W, b, output_name=output_name,
                    temperature=temperature)
    set_metadata(m, model_metadata(labels=labels, backbone=backbone, metrics=metrics, output_name=output_name,
                                   extra={"backbone_precision": graph, "bottleneck_precision": precision,
                                          **(extra_meta or {})}))
    import onnx

    onnx.checker.check_model(m)
    save_atomic(m, Path(path))
    if check is not None:
        return verify(path, *check)
    return 0.0
