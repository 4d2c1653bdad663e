"""A backbone's features graph: (N, 3, H, W) normalised pixels -> (N, C) pooled features, as one
ONNX file in the user cache, exported once (through torch, for the built-in EfficientNet-Lite)
and kept only when ONNX Runtime agrees with PyTorch; its int8 form, quantized once.
The file name carries the backbone's fingerprint, so any change makes a new one.
torch is imported only here (and in retrain.finetune), and only when a graph is not cached yet.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict
from pathlib import Path

from retrain.architectures import OPSET, PRECISIONS, Backbone, backbone_record, calibration_files, weights_path
from retrain.errors import ConfigError, MissingDependency, did_you_mean
from retrain.files import cache_root
from retrain.progress import Log


def build_torch(bb: Backbone):
    """The PyTorch EfficientNet-Lite with ImageNet weights (loaded with weights_only=True)."""
    if bb.kind != "torch":
        raise bb.fine_tune_error()
    try:
        import torch
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as e:
        raise MissingDependency(
            f"building the {bb.name} backbone needs torch and efficientnet-lite-pytorch ({e}); "
            "pip install torch==2.13.0 efficientnet-lite-pytorch") from None
    model = EfficientNet.from_name(bb.model_name)
    state = torch.load(weights_path(bb), map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model.eval()


def feature_module(model):
    """Wrap an EfficientNet so that forward(x) gives global-pooled features (N, C)."""
    import torch

    class Features(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):  # (N, 3, H, W) -> (N, C)
            return self.net.extract_features(x).mean(dim=(2, 3))

    return Features(model).eval()


def feature_net(bb: Backbone):
    """The torch module (N, 3, H, W) -> (N, feature_dim) of a built-in backbone, or of built-in
    backbones side by side (kind concat: each one's pooled features, concatenated in order)."""
    if bb.kind != "concat":
        return feature_module(build_torch(bb))
    import torch

    class Concat(torch.nn.Module):
        def __init__(self, nets):
            super().__init__()
            self.nets = torch.nn.ModuleList(nets)

        def forward(self, x):
            return torch.cat([net(x) for net in self.nets], dim=1)

    return Concat([feature_module(build_torch(m)) for m in bb.members]).eval()


def export_onnx(module, path: Path, size: int, *, output_name: str = "features") -> None:
    """Export a torch module (N,3,size,size) -> (N,C) to ONNX with a dynamic batch axis."""
    import warnings

    import torch

    x = torch.zeros(2, 3, size, size)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (x,), str(path), input_names=["input"], output_names=[output_name],
                          dynamic_axes={"input": {0: "N"}, output_name: {0: "N"}},
                          opset_version=OPSET, dynamo=False)


def features_onnx(bb: Backbone, *, precision: str = "fp32", log=None) -> Path:
    """Path of the cached feature-extractor ONNX for `bb`; exported and verified on first use.

    The export is checked against PyTorch on random input (max abs difference < 1e-3) before
    it is kept. The file name carries the fingerprint, so any change makes a new one.
    precision "int8": the fp32 graph statically quantized (see quantize_backbone_int8); "bf16": the fp32
    graph (bf16 is how OpenVINO runs it, not a different file).
    """
    log = log or Log.silent()
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision '{precision}'; choose one of {', '.join(PRECISIONS)}."
                          f"{did_you_mean(precision, PRECISIONS)}")
    if precision == "int8":
        return quantize_backbone_int8(bb, features_onnx(bb, log=log), log=log)
    out = cache_root() / "backbones" / f"{bb.name}-{bb.fingerprint()}.onnx"
    if out.is_file():
        return out
    if not bb.built_in:  # cut again from its source file (the cached graph was removed)
        from retrain import onnx_backbone as ob

        if not Path(bb.source).is_file():
            raise MissingDependency(f"the features graph of {bb.name} is no longer cached and its source {bb.source} "
                                    "is gone: give --architecture the model file again")
        request = {"tensor": bb.tensor, "mean": bb.mean, "std": bb.std, "height": bb.image_size,
                   "width": bb.image_size}
        info = ob.analyse(bb.source, name=bb.name, sha256=bb.sha256, request=request,
                          table={"crop_fraction": bb.crop}, log=log)
        ob.save_atomic(info["graph"], out, {**backbone_record(bb), "fingerprint": bb.fingerprint()})
        return out
    log(f"Exporting {bb.name} to ONNX once (cached in {out.parent}) ...")
    export_checked(feature_net(bb), out, bb.image_size, expect=(bb.feature_dim,),
                   sidecar={**asdict(bb), "fingerprint": bb.fingerprint()})
    return out


def export_checked(module, out: Path, size: int, *, output_name: str = "features", expect=None,
                   sidecar: dict | None = None) -> None:
    """Export `module` (N,3,size,size) -> (N, ...) to `out`, kept only if ONNX Runtime agrees with
    PyTorch on random input (max abs difference < 1e-3) and the output shape is (N, *expect).
    Written atomically; `sidecar` (plus the parity and torch version) goes to out.json."""
    import numpy as np
    import onnxruntime as ort
    import torch

    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=".part-", suffix=".onnx")
    os.close(fd)
    try:
        export_onnx(module, Path(tmp), size, output_name=output_name)
        x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            ref = module(x).numpy()
        got = ort.InferenceSession(tmp, providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]
        diff = float(np.abs(got - ref).max())
        if got.shape != ref.shape or (expect is not None and got.shape[1:] != tuple(expect)) or diff > 1e-3:
            raise RuntimeError(f"ONNX export to {out.name} disagrees with PyTorch (max diff {diff:.2e}, "
                               f"shape {got.shape})")
        if sidecar is not None:
            with open(out.with_suffix(".json"), "w") as f:
                json.dump({**sidecar, "parity_max_abs_diff": diff, "torch": torch.__version__}, f, indent=1)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def calibration_inputs(bb: Backbone):
    """The photos shipped in retrain/calibration, centre-cropped and normalised for bb: (n, 3, H, W)."""
    import numpy as np

    from retrain import images

    return images.normalize(np.stack([images.load(str(p), bb.image_size, bb.crop_fraction)
                                      for p in calibration_files()]), bb.mean, bb.std)


def quantize_graph_int8(fp32_path: Path, out_path: Path, x, *, reduce_range: bool = False) -> None:
    """Static int8 quantization (QOperator, per-channel int8 weights, uint8 activations) of the
    graph at fp32_path, calibrated on the inputs x, written to out_path. reduce_range: 7-bit
    weights (ONNX Runtime's remedy for CPUs whose int8 kernels overflow; benchmarks only)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"input": x[i:i + 8]} for i in range(0, len(x), 8)])

        def get_next(self):
            return next(self.batches, None)

    with tempfile.TemporaryDirectory(dir=Path(out_path).parent) as tmpdir:
        pre = os.path.join(tmpdir, "pre.onnx")
        quant_pre_process(str(fp32_path), pre)
        cwd = os.getcwd()
        os.chdir(tmpdir)  # the quantizer leaves scratch files in the working folder
        try:
            quantize_static(pre, str(out_path), Reader(), quant_format=QuantFormat.QOperator, per_channel=True,
                            reduce_range=reduce_range, activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8)
        finally:
            os.chdir(cwd)


def mean_cosine(a, b) -> float:
    """Mean cosine similarity of the rows of two feature arrays."""
    import numpy as np

    return float(((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)).mean())


def quantize_backbone_int8(bb: Backbone, fp32_path: Path, *, log=None) -> Path:
    """Static int8 quantization (quantize_graph_int8) of the feature extractor, calibrated on the
    fixed photos shipped in retrain/calibration, so the int8 bottlenecks of an image never depend
    on which data set came first. Checked against fp32 (mean cosine similarity of features >=
    0.98) before it is kept."""
    out = cache_root() / "backbones" / f"{bb.name}-{bb.fingerprint('int8')}-int8.onnx"
    if out.is_file():
        return out
    log = log or Log.silent()
    log(f"Quantizing {bb.name} to int8 once (calibrated on {len(calibration_files())} photos) ...")
    import onnxruntime as ort

    x = calibration_inputs(bb)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmpdir:
        q = os.path.join(tmpdir, "q.onnx")
        quantize_graph_int8(fp32_path, q, x)
        ref = ort.InferenceSession(str(fp32_path), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
        got = ort.InferenceSession(q, providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
        cos = mean_cosine(ref, got)
        if cos < 0.98:
            raise RuntimeError(f"int8 {bb.name} features disagree with fp32 (mean cosine {cos:.4f})")
        with open(out.with_suffix(".json"), "w") as f:
            json.dump({"backbone": bb.name, "precision": "int8", "fingerprint": bb.fingerprint("int8"),
                       "calibration_photos": len(x), "mean_cosine_vs_fp32": cos,
                       "onnxruntime": ort.__version__}, f, indent=1)
        os.replace(q, out)
    return out


def export_classifier(bb: Backbone, path: Path) -> Path:
    """The built-in backbone *with its ImageNet classifier* as one ONNX file (input `images`,
    output `logits`, dynamic batch, its mean/std in the metadata): a model as a user brings one
    from torchvision or timm, for `--architecture path.onnx` (tests and benchmarks use it)."""
    import warnings

    import onnx
    import torch

    net = build_torch(bb)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.zeros(1, 3, bb.image_size, bb.image_size),), str(path),
                          input_names=["images"], output_names=["logits"],
                          dynamic_axes={"images": {0: "N"}, "logits": {0: "N"}}, opset_version=OPSET, dynamo=False)
    m = onnx.load(str(path))
    for k, v in (("mean", json.dumps(bb.mean)), ("std", json.dumps(bb.std))):
        m.metadata_props.add(key=k, value=v)
    onnx.save(m, str(path))
    return path
