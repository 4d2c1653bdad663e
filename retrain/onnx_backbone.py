"""A backbone from any ONNX image model: an ImageNet classifier or a feature-vector model.

retrain turns the model into a *features graph* like its EfficientNet-Lite one, so that the
rest of the pipeline (the bottleneck cache, OpenVINO bf16, int8 quantization, model.write_model)
runs on it unchanged: input `input` (N, 3, H, W) float32, (pixel - mean) / std in 0..255 units,
RGB, NCHW -> output (N, C) features, any batch size.

Which tensor (`find_candidates`): for each float output of the graph, walk back through
softmax, bias adds, scalings, flattens and reshapes to the last dense layer (Gemm, MatMul, or a
1x1 Conv on pooled features): its input is the pooled penultimate features. An output with no
dense layer before it is itself the features (a feature-vector model). One candidate is taken;
several are an error that lists them (choose with --bottleneck-tensor NAME, which takes any
tensor of shape (N, C), or a feature map (N, C, h, w), which is then global-average pooled).

The cut graph keeps only the nodes that tensor needs. A model that expects NHWC gets a
Transpose in front, one that expects BGR a channel reversal, so the written model keeps
retrain's NCHW RGB input contract; mean and std (numbers or one per channel) go to the model's
metadata, as for any retrain model. The batch axis is made dynamic and checked (a batch of 3
must equal three batches of 1). Preprocessing comes from, in this order: the flags
(--input_mean, --input_std, --input_height, --input_width), the model's metadata (keys `mean`,
`std` in 0..255 units, `input_size`, `crop_fraction` or `crop_pct`, `layout`, `color` or
`channel_order`, `resize` or `interpolation`), the backbone table (retrain.zoo), the graph's
fixed input size, and the ImageNet defaults (224 px, mean 123.675,116.28,103.53, std
58.395,57.12,57.375, crop 0.875). retrain resizes bicubic; a model that asks for another
method is told so.

The features graph and a JSON description are cached under <cache>/backbones, keyed by the
file's SHA-256 and everything above (retrain.architectures.Backbone.fingerprint).

Here: reading the model, the preprocessing, `analyse` (the recipe); retrain.onnx_cut finds the
tensor, cuts the graph there, adapts its input and checks the cut.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path

import numpy as np

from retrain.errors import ConfigError, ModelError

ONNX_SCHEMA = 1  # bump when the cut or the adaptation changes: invalidates cached features graphs
DEFAULT_SIZE = 224
DEFAULT_CROP = 0.875
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)


# ------------------------------------------------------------------------------ flags

def parse_channels(value, flag: str, lo: float, hi: float):
    """A number or a comma list of 3 (R, G, B), in 0..255 units -> float or tuple of 3 floats."""
    if value is None or value == "":
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        parts = [float(value)]
    else:
        try:
            parts = [float(p) for p in str(value).replace(" ", "").split(",") if p != ""]
        except ValueError:
            raise ConfigError(f"{flag} expects a number or three comma-separated numbers (R,G,B), "
                              f"got '{value}'") from None
    if len(parts) not in (1, 3) or not all(math.isfinite(p) and lo <= p <= hi for p in parts):
        raise ConfigError(f"{flag} expects a number or three comma-separated numbers (R,G,B) from {lo:g} "
                          f"to {hi:g}, got '{value}'")
    return parts[0] if len(parts) == 1 else tuple(parts)


# ------------------------------------------------------------------------------ reading the model

def load_model(path):
    """The ModelProto of `path`; a ModelError (one line) for anything that is not an ONNX model."""
    import onnx

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"backbone model not found: {p} (give an .onnx file, an https:// URL, or a name "
                          "from `retrain backbones`)")
    try:
        m = onnx.load(str(p))
    except Exception as e:  # protobuf DecodeError, external data missing, ...
        msg = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise ModelError(f"{p} is not an ONNX model ({msg}); give an ONNX image classifier or "
                         "feature extractor") from None
    if not m.graph.node:
        raise ModelError(f"{p} is not an ONNX model with a graph (it has no nodes); give an ONNX image "
                         "classifier or feature extractor")
    return m


def metadata(model) -> dict:
    out = {}
    for p in model.metadata_props:
        try:
            out[p.key] = json.loads(p.value)
        except ValueError:
            out[p.key] = p.value
    return out


def _dims(vi) -> list:
    t = vi.type.tensor_type
    if not t.HasField("shape"):
        return []
    return [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]


def image_input(model, where) -> dict:
    """The one image input: name, layout (NCHW or NHWC), fixed (H, W) or Nones."""
    g = model.graph
    inits = {i.name for i in g.initializer}
    ins = [i for i in g.input if i.name not in inits]
    if len(ins) != 1:
        raise ModelError(f"{where} has {len(ins)} inputs ({', '.join(i.name for i in ins) or 'none'}); a backbone "
                         "takes one image input")
    vi = ins[0]
    dims = _dims(vi)
    shown = "[" + ", ".join("?" if d is None else str(d) for d in dims) + "]"
    what = (f"{where} is not an image model: its input '{vi.name}' has shape {shown}; a backbone takes "
            "(N, 3, H, W) or (N, H, W, 3) float32 pixels")
    if vi.type.tensor_type.elem_type != 1:
        import onnx

        kind = onnx.TensorProto.DataType.Name(vi.type.tensor_type.elem_type).lower()
        raise ModelError(f"{where}: its input '{vi.name}' is {kind}; a backbone takes float32 pixels "
                         "(re-export the model with a float input)")
    if len(dims) != 4:
        raise ModelError(what)
    meta = metadata(model)
    declared = str(meta.get("layout", "")).upper()
    if declared in ("NCHW", "NHWC"):
        layout = declared
    elif dims[1] == 3:
        layout = "NCHW"
    elif dims[3] == 3:
        layout = "NHWC"
    elif dims[1] is None and dims[3] is None:
        layout = "NCHW"
    else:
        raise ModelError(what)
    c, h, w = (dims[1], dims[2], dims[3]) if layout == "NCHW" else (dims[3], dims[1], dims[2])
    if c not in (3, None):
        raise ModelError(what)
    return {"name": vi.name, "layout": layout, "height": h, "width": w, "batch": dims[0], "shape": shown}


# ------------------------------------------------------------------------------ resolving a backbone

def request_key(*, name: str, sha256: str, request: dict, table: dict | None) -> str:
    key = {"schema": ONNX_SCHEMA, "name": name, "sha256": sha256, "request": request, "table": table}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=list).encode()).hexdigest()[:16]


def resolved_path(key: str) -> Path:
    from retrain.files import cache_root

    return cache_root() / "backbones" / "resolved" / f"{key}.json"


def _fmt(v) -> str:
    if isinstance(v, (tuple, list)):
        return ",".join(f"{x:g}" for x in v)
    return f"{v:g}"


def _channels_from_meta(v):
    if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
        return float(v)
    if isinstance(v, list) and len(v) == 3 and all(isinstance(x, (int, float)) for x in v):
        return tuple(float(x) for x in v)
    return None


def analyse(path, *, name: str, sha256: str, request: dict, table: dict | None = None, log=None) -> dict:
    """Everything retrain needs to know about `path` as a backbone (the Backbone's fields), plus
    the features graph (key "graph", a ModelProto). Raises ModelError / ConfigError in one line."""
    from retrain.onnx_cut import cut_and_verify, looks_untrained

    where = Path(path).name
    model = load_model(path)
    inp = image_input(model, where)
    meta = metadata(model)
    table = table or {}
    notes = []
    size, size_from = _input_size(request, meta, table, inp, where, notes)
    color = _color(meta, where)
    pixels = _pixels(request, meta, table, notes)
    chosen = _choose_tensor(model, inp, request, size, where)
    tensor = chosen["tensor"]
    graph, reduce, width = cut_and_verify(model, inp, tensor, size=size, color=color, where=where)
    if looks_untrained(graph):
        notes.append("every convolution bias is 0: the weights look untrained (features will be poor)")
    params = int(sum(np.prod(i.dims) for i in graph.graph.initializer if i.data_type in (1, 10, 11)))
    if inp["layout"] != "NCHW" or color != "RGB":
        notes.insert(0, f"the model takes {inp['layout']} {color}: adapted inside the graph, so the model retrain "
                        "writes takes NCHW RGB")
    summary = _summary(name, tensor, width, chosen["how"], reduce, size, size_from, pixels, notes)
    mean, std = pixels["mean"], pixels["std"]
    return {"name": name, "sha256": sha256, "image_size": size, "feature_dim": width, "params": params,
            "mean": list(mean) if isinstance(mean, tuple) else float(mean),
            "std": list(std) if isinstance(std, tuple) else float(std),
            "crop": float(pixels["crop"]), "tensor": tensor, "layout": inp["layout"], "color": color,
            "reduce": reduce, "source": str(Path(path).resolve()), "description": summary, "graph": graph}


def _input_size(request: dict, meta: dict, table: dict, inp: dict, where, notes: list) -> tuple[int, str]:
    """(size, where it comes from): the flags, the metadata, the table, the graph, the default."""
    h, w = request.get("height"), request.get("width")
    if h is not None or w is not None:
        h, w = h or w, w or h
        if h != w:
            raise ConfigError(f"--input_height {h} and --input_width {w} differ; retrain needs a square input")
        size, size_from = int(h), "from --input_height/--input_width"
    elif isinstance(meta.get("input_size"), int):
        size, size_from = int(meta["input_size"]), "from the model's metadata"
    elif table.get("size"):
        size, size_from = int(table["size"]), "from the backbone table"
    elif inp["height"] and inp["width"]:
        if inp["height"] != inp["width"]:
            raise ConfigError(f"{where} takes {inp['height']}x{inp['width']} images; retrain needs a square input "
                              "(re-export the model with a square input size)")
        size, size_from = int(inp["height"]), "the graph's"
    else:
        size, size_from = DEFAULT_SIZE, ("by default: the graph's size is not fixed; --input_height/--input_width "
                                         "to change")
    if not 16 <= size <= 4096:
        raise ConfigError(f"input size {size} is outside 16..4096 pixels")
    if inp["height"] and inp["height"] != size:
        notes.append(f"the graph was exported at {inp['height']}x{inp['width']}; run at {size}x{size}")
    return size, size_from


def _color(meta: dict, where) -> str:
    color = str(meta.get("color", meta.get("channel_order", "RGB"))).upper()
    if color not in ("RGB", "BGR"):
        raise ModelError(f"{where}: metadata 'color' is '{color}'; expected RGB or BGR")
    return color


def _pixels(request: dict, meta: dict, table: dict, notes: list) -> dict:
    """mean, std, crop (each from the flags, the metadata, the table or the default), crop_from,
    and `source`: the words that say where mean and std come from."""
    mean, std, source = request.get("mean"), request.get("std"), []
    if mean is None:
        mean = _channels_from_meta(meta.get("mean"))
        mean_from = "metadata" if mean is not None else None
    else:
        mean_from = "flags"
    if std is None:
        std = _channels_from_meta(meta.get("std"))
        std_from = "metadata" if std is not None else None
    else:
        std_from = "flags"
    if mean is None and table.get("mean") is not None:
        mean, mean_from = tuple(table["mean"]), "table"
    if std is None and table.get("std") is not None:
        std, std_from = tuple(table["std"]), "table"
    if mean is None:
        mean, mean_from = IMAGENET_MEAN, "default"
    if std is None:
        std, std_from = IMAGENET_STD, "default"
    if isinstance(std, tuple) and not all(s > 0 for s in std) or isinstance(std, float) and not std > 0:
        raise ConfigError(f"std must be positive, got {_fmt(std)}")
    crop = meta.get("crop_fraction", meta.get("crop_pct"))
    crop_from = "metadata"
    if not (isinstance(crop, (int, float)) and 0 < crop <= 1):
        crop, crop_from = table.get("crop_fraction", DEFAULT_CROP), ("table" if "crop_fraction" in table else "default")
    resize = str(meta.get("resize", meta.get("interpolation", table.get("resize", "bicubic")))).lower()
    if resize != "bicubic":
        notes.append(f"the model asks for {resize} resizing; retrain resizes bicubic")
    words = {"flags": "from --input_{}", "metadata": "from the model's metadata", "table": "from the backbone table",
             "default": "ImageNet defaults: --input_mean/--input_std to change"}
    if mean_from == std_from:
        source.append(words[mean_from].format("mean/--input_std"))
    else:
        source += [f"{w} {words[f].format(w)}" for w, f in (("mean", mean_from), ("std", std_from))]
    return {"mean": mean, "std": std, "crop": crop, "crop_from": crop_from, "source": source}


def _choose_tensor(model, inp: dict, request: dict, size: int, where) -> dict:
    """{tensor, how}: the --bottleneck-tensor, else the one candidate (several are an error)."""
    from retrain.onnx_cut import feature_width, find_candidates, probe

    wanted = request.get("tensor")
    if wanted:
        names = {o for n in model.graph.node for o in n.output} | {o.name for o in model.graph.output}
        if wanted not in names:
            from retrain.errors import did_you_mean

            raise ConfigError(f"--bottleneck-tensor '{wanted}' is not a tensor of {where}."
                              f"{did_you_mean(wanted, names)}")
        return {"tensor": wanted, "how": "chosen with --bottleneck-tensor"}
    cands = find_candidates(model)
    if not cands:
        raise ModelError(f"{where} has no float output to take features from; choose a tensor with "
                         "--bottleneck-tensor NAME")
    if len(cands) > 1:
        values = probe(model, inp, [c["tensor"] for c in cands], size)
        listed = "; ".join(f"'{c['tensor']}' ({feature_width(values[c['tensor']], inp['layout'])} wide, {c['how']})"
                           for c in cands)
        raise ConfigError(f"{where} has {len(cands)} candidate feature tensors: {listed}; choose one with "
                          "--bottleneck-tensor NAME")
    return cands[0]


def _summary(name: str, tensor: str, width: int, how: str, reduce: str, size: int, size_from: str, pixels: dict,
             notes: list) -> str:
    """The one paragraph `retrain fit` logs about the backbone."""
    pooled = {"": "", "flatten": ", flattened", "gap": ", global-average pooled",
              "mean_nhwc": ", global-average pooled"}[reduce]
    crop_words = {"metadata": "from the model's metadata", "table": "from the backbone table", "default": "default"}
    return (f"Backbone {name}: features '{tensor}' ({width} wide, {how}{pooled}); input {size}x{size} "
            f"({size_from}); mean {_fmt(pixels['mean'])}, std {_fmt(pixels['std'])} ({'; '.join(pixels['source'])}); "
            f"crop {pixels['crop']:g} ({crop_words[pixels['crop_from']]}), bicubic resize"
            + "".join(f"; note: {n}" for n in notes))


def save_atomic(model, out: Path, sidecar: dict) -> None:
    """The features graph and, first, its sidecar out.json (what made it)."""
    from retrain.files import save_onnx_atomic, write_json_atomic

    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out.with_suffix(".json"), sidecar)
    save_onnx_atomic(model, out)


def safe_name(text: str) -> str:
    """A file-system-safe backbone name from a file name or URL."""
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(text)).strip("._") or "model"
    return stem[:80]
