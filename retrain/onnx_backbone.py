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
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import tempfile
from pathlib import Path

import numpy as np

from retrain.errors import ConfigError, ModelError

ONNX_SCHEMA = 1  # bump when the cut or the adaptation changes: invalidates cached features graphs
DEFAULT_SIZE = 224
DEFAULT_CROP = 0.875
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)

# Ops walked through from an output back to the last dense layer.
PASS_OPS = {"Softmax", "LogSoftmax", "Identity", "Sigmoid", "Flatten", "Reshape", "Squeeze", "Unsqueeze",
            "Cast", "Dropout", "Clip"}
AFFINE_OPS = {"Add", "Sub", "Mul", "Div"}  # with one constant operand: a bias, a temperature
DENSE_OPS = {"Gemm", "MatMul"}
MAX_WALK = 64


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


def _constants(g) -> set:
    names = {i.name for i in g.initializer}
    for n in g.node:
        if n.op_type == "Constant":
            names.update(n.output)
    # An Identity of a constant is a constant too (exporters like it).
    for n in g.node:
        if n.op_type == "Identity" and n.input and n.input[0] in names:
            names.update(n.output)
    return names


def _producers(g) -> dict:
    return {o: n for n in g.node for o in n.output}


def _walk_to_dense(g, tensor, producers, consts):
    """From `tensor` back to the last dense layer: (its feature input, the node) or None."""
    t = tensor
    for _ in range(MAX_WALK):
        n = producers.get(t)
        if n is None:
            return None
        op = n.op_type
        if op in DENSE_OPS and len(n.input) >= 2:
            a, b = n.input[0], n.input[1]
            if op == "Gemm":
                trans_a = next((x.i for x in n.attribute if x.name == "transA"), 0)
                if b in consts and not trans_a:
                    return a, n
                return None
            if b in consts and a not in consts:
                return a, n
            if a in consts and b not in consts:
                return b, n
            return None
        if op == "Conv" and len(n.input) >= 2 and n.input[1] in consts:
            kernel = next((list(x.ints) for x in n.attribute if x.name == "kernel_shape"), None)
            if kernel is None:
                w = next((i for i in g.initializer if i.name == n.input[1]), None)
                kernel = list(w.dims[2:]) if w is not None else None
            if kernel and all(k == 1 for k in kernel):
                return n.input[0], n  # a 1x1 convolution as the classifier (Keras MobileNet, SqueezeNet)
            return None
        if op in PASS_OPS and n.input:
            t = n.input[0]
            continue
        if op in AFFINE_OPS and len(n.input) == 2:
            var = [i for i in n.input if i not in consts]
            if len(var) == 1:
                t = var[0]
                continue
        return None
    return None


def find_candidates(model) -> list[dict]:
    """Where the pooled features may be: [{tensor, how, node}] (see the module docstring)."""
    g = model.graph
    producers, consts = _producers(g), _constants(g)
    out, seen = [], set()
    for o in g.output:
        if o.type.tensor_type.elem_type not in (1, 10, 11):  # float, float16, double
            continue
        hit = _walk_to_dense(g, o.name, producers, consts)
        if hit is not None:
            t, node = hit
            how = f"the input of the final {node.op_type}" + (f" '{node.name}'" if node.name else "")
        else:
            t, how = o.name, "the model's output"
        if t not in seen:
            seen.add(t)
            out.append({"tensor": t, "how": how})
    return out


# ------------------------------------------------------------------------------ cutting

def _subgraph_refs(node) -> set:
    """Names a node's subgraphs (If, Loop, Scan) read from the outer scope."""
    refs = set()
    for a in node.attribute:
        for sub in ([a.g] if a.HasField("g") else []) + list(a.graphs):
            inner = {o for n in sub.node for o in n.output} | {i.name for i in sub.input} \
                | {i.name for i in sub.initializer}
            for n in sub.node:
                refs.update(i for i in n.input if i and i not in inner)
                refs.update(_subgraph_refs(n) - inner)
    return refs


def _needed(g, tensor, input_name) -> list:
    """The nodes `tensor` depends on, in graph order; ModelError if it does not depend on the input."""
    producers = {o: i for i, n in enumerate(g.node) for o in n.output}
    need, stack, reaches = set(), [tensor], False
    seen = set()
    while stack:
        t = stack.pop()
        if t in seen or not t:
            continue
        seen.add(t)
        if t == input_name:
            reaches = True
            continue
        i = producers.get(t)
        if i is None or i in need:
            continue
        need.add(i)
        n = g.node[i]
        stack.extend(n.input)
        stack.extend(_subgraph_refs(n))
    if not reaches:
        raise ModelError(f"tensor '{tensor}' does not depend on the model's input; choose another with "
                         "--bottleneck-tensor")
    return [g.node[i] for i in sorted(need)]


def _rename_input(node, old: str, new: str):
    import onnx

    n = onnx.NodeProto()
    n.CopyFrom(node)
    for k, name in enumerate(n.input):
        if name == old:
            n.input[k] = new
    for a in n.attribute:
        for sub in ([a.g] if a.HasField("g") else []) + list(a.graphs):
            for inner in sub.node:
                for k, name in enumerate(inner.input):
                    if name == old:
                        inner.input[k] = new
    return n


def _opset(model) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)


def features_model(model, inp: dict, tensor: str, *, reduce: str, size: int, color: str):
    """The features graph (see the module docstring) of `model` cut at `tensor`.

    reduce: "" (tensor is (N, C)), "flatten" ((N, C, 1, 1) or (N, 1, 1, C)), "gap" (an NCHW map),
    "mean_nhwc" (an NHWC map)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    g = model.graph
    nodes = _needed(g, tensor, inp["name"])
    names = {o for n in nodes for o in n.output} | {i.name for i in g.initializer} | {inp["name"]}
    internal = _unique("retrain_model_input", names)
    pre, x = [], "input"
    if "input" in names and inp["name"] != "input":
        raise ModelError("the model has a tensor named 'input' that is not its input; rename it to use the "
                         "model as a backbone")
    if color == "BGR":
        idx = _unique("retrain_bgr_index", names)
        pre.append(helper.make_node("Constant", [], [idx], value=numpy_helper.from_array(
            np.array([2, 1, 0], np.int64), idx)))
        pre.append(helper.make_node("Gather", [x, idx], ["retrain_bgr"], axis=1, name="retrain_rgb_to_bgr"))
        x = "retrain_bgr"
    if inp["layout"] == "NHWC":
        pre.append(helper.make_node("Transpose", [x], ["retrain_nhwc"], perm=[0, 2, 3, 1], name="retrain_to_nhwc"))
        x = "retrain_nhwc"
    pre.append(helper.make_node("Identity", [x], [internal], name="retrain_input"))
    body = [_rename_input(n, inp["name"], internal) for n in nodes]
    post, y = [], tensor
    if reduce == "gap":
        post.append(helper.make_node("GlobalAveragePool", [y], ["retrain_pooled"], name="retrain_pool"))
        post.append(helper.make_node("Flatten", ["retrain_pooled"], ["retrain_flat"], axis=1, name="retrain_flatten"))
        y = "retrain_flat"
    elif reduce == "mean_nhwc":
        if _opset(model) >= 18:
            ax = _unique("retrain_pool_axes", names)
            post.append(helper.make_node("Constant", [], [ax], value=numpy_helper.from_array(
                np.array([1, 2], np.int64), ax)))
            post.append(helper.make_node("ReduceMean", [y, ax], ["retrain_flat"], keepdims=0, name="retrain_pool"))
        else:
            post.append(helper.make_node("ReduceMean", [y], ["retrain_flat"], axes=[1, 2], keepdims=0,
                                         name="retrain_pool"))
        y = "retrain_flat"
    elif reduce == "flatten":
        post.append(helper.make_node("Flatten", [y], ["retrain_flat"], axis=1, name="retrain_flatten"))
        y = "retrain_flat"
    out = _unique("features", names)
    post.append(helper.make_node("Identity", [y], [out], name="retrain_features"))
    used = {i for n in body for i in n.input} | set().union(*[_subgraph_refs(n) for n in body] or [set()])
    inits = [i for i in g.initializer if i.name in used]
    graph = helper.make_graph(
        pre + body + post, "retrain_features",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, size, size])],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["N", None])], inits)
    m = helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=model.ir_version,
                          producer_name="retrain")
    m.functions.extend(model.functions)
    try:
        onnx.checker.check_model(m)
    except Exception as e:
        raise ModelError(f"cutting the model at '{tensor}' gave an invalid graph ({str(e).splitlines()[0][:160]})") \
            from None
    return m


def _unique(name: str, taken: set) -> str:
    k, n = 1, name
    while n in taken:
        k += 1
        n = f"{name}_{k}"
    return n


def _session(model_or_path):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 4  # errors come back as exceptions, said in one line
    so.intra_op_num_threads = os.cpu_count() or 1
    src = model_or_path.SerializeToString() if hasattr(model_or_path, "SerializeToString") else str(model_or_path)
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])


def _first_line(e: Exception) -> str:
    text = (str(e).strip().splitlines() or [type(e).__name__])[0]
    text = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", text)
    return text[:120] + ("..." if len(text) > 120 else "")


def probe(model, inp: dict, tensors: list[str], size: int) -> dict:
    """Run the model once (batch 1, zeros, at `size`) and return each tensor's value."""
    import onnx
    from onnx import TensorProto, helper

    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    del g.value_info[:]
    del g.output[:]
    g.output.extend([helper.make_tensor_value_info(t, TensorProto.FLOAT, None) for t in tensors])
    vi = next(i for i in g.input if i.name == inp["name"])
    shape = [1, 3, size, size] if inp["layout"] == "NCHW" else [1, size, size, 3]
    dims = vi.type.tensor_type.shape.dim
    for d, v in zip(dims, shape):
        d.Clear()
        d.dim_value = v
    try:
        sess = _session(m)
        outs = sess.run(tensors, {inp["name"]: np.zeros(shape, np.float32)})
    except Exception as e:
        raise ModelError(f"ONNX Runtime cannot run the model on a {size}x{size} image ({_first_line(e)})"
                         + ("; use its own input size or give --input_height/--input_width" if size else "")) \
            from None
    return dict(zip(tensors, outs))


def reduction(value: np.ndarray, layout: str, tensor: str, where) -> str:
    """How a probed tensor becomes (N, C): "", "flatten", "gap" or "mean_nhwc"; error otherwise."""
    shape = tuple(value.shape)
    if len(shape) == 2:
        return ""
    if len(shape) == 4:
        spatial = shape[2:] if layout == "NCHW" else shape[1:3]
        if all(s == 1 for s in spatial):
            return "flatten"
        return "gap" if layout == "NCHW" else "mean_nhwc"
    raise ModelError(f"{where}: tensor '{tensor}' has shape {list(shape)} (batch 1): not pooled features (N, C) "
                     "or a feature map (N, C, H, W); choose another with --bottleneck-tensor")


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
    where = Path(path).name
    model = load_model(path)
    inp = image_input(model, where)
    meta = metadata(model)
    table = table or {}
    notes = []

    # --- input size
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

    # --- colour order and pixel scaling
    color = str(meta.get("color", meta.get("channel_order", "RGB"))).upper()
    if color not in ("RGB", "BGR"):
        raise ModelError(f"{where}: metadata 'color' is '{color}'; expected RGB or BGR")
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

    # --- the tensor
    wanted = request.get("tensor")
    if wanted:
        names = {o for n in model.graph.node for o in n.output} | {o.name for o in model.graph.output}
        if wanted not in names:
            from retrain.errors import did_you_mean

            raise ConfigError(f"--bottleneck-tensor '{wanted}' is not a tensor of {where}."
                              f"{did_you_mean(wanted, names)}")
        chosen = {"tensor": wanted, "how": "chosen with --bottleneck-tensor"}
    else:
        cands = find_candidates(model)
        if not cands:
            raise ModelError(f"{where} has no float output to take features from; choose a tensor with "
                             "--bottleneck-tensor NAME")
        if len(cands) > 1:
            values = probe(model, inp, [c["tensor"] for c in cands], size)
            listed = "; ".join(f"'{c['tensor']}' ({_width(values[c['tensor']], inp['layout'])} wide, {c['how']})"
                               for c in cands)
            raise ConfigError(f"{where} has {len(cands)} candidate feature tensors: {listed}; choose one with "
                              "--bottleneck-tensor NAME")
        chosen = cands[0]
    tensor = chosen["tensor"]
    value = probe(model, inp, [tensor], size)[tensor]
    reduce = reduction(value, inp["layout"], tensor, where)
    graph = features_model(model, inp, tensor, reduce=reduce, size=size, color=color)
    feats = _check_graph(graph, size, where)
    ref = _reduce(value, reduce)
    if feats.shape[1] != ref.shape[1] or not np.allclose(_run(graph, np.zeros((1, 3, size, size), np.float32)),
                                                         ref, rtol=1e-3, atol=1e-4):
        raise ModelError(f"the features graph cut from {where} at '{tensor}' does not reproduce the model's own "
                         "values; choose another tensor with --bottleneck-tensor")
    width = int(feats.shape[1])
    if _looks_untrained(graph):
        notes.append("every convolution bias is 0: the weights look untrained (features will be poor)")
    params = int(sum(np.prod(i.dims) for i in graph.graph.initializer if i.data_type in (1, 10, 11)))
    pooled = {"": "", "flatten": ", flattened", "gap": ", global-average pooled",
              "mean_nhwc": ", global-average pooled"}[reduce]
    if inp["layout"] != "NCHW" or color != "RGB":
        notes.insert(0, f"the model takes {inp['layout']} {color}: adapted inside the graph, so the model retrain "
                        "writes takes NCHW RGB")
    crop_words = {"metadata": "from the model's metadata", "table": "from the backbone table", "default": "default"}
    summary = (f"Backbone {name}: features '{tensor}' ({width} wide, {chosen['how']}{pooled}); input {size}x{size} "
               f"({size_from}); mean {_fmt(mean)}, std {_fmt(std)} ({'; '.join(source)}); crop {crop:g} "
               f"({crop_words[crop_from]}), bicubic resize" + "".join(f"; note: {n}" for n in notes))
    return {"name": name, "sha256": sha256, "image_size": size, "feature_dim": width, "params": params,
            "mean": list(mean) if isinstance(mean, tuple) else float(mean),
            "std": list(std) if isinstance(std, tuple) else float(std),
            "crop": float(crop), "tensor": tensor, "layout": inp["layout"], "color": color, "reduce": reduce,
            "source": str(Path(path).resolve()), "description": summary, "graph": graph}


def _width(value: np.ndarray, layout: str) -> int:
    if value.ndim == 2:
        return int(value.shape[1])
    if value.ndim == 4:
        return int(value.shape[1] if layout == "NCHW" else value.shape[3])
    return int(value.shape[-1])


def _reduce(value: np.ndarray, reduce: str) -> np.ndarray:
    if reduce == "":
        return value
    if reduce == "flatten":
        return value.reshape(len(value), -1)
    if reduce == "gap":
        return value.mean(axis=(2, 3))
    return value.mean(axis=(1, 2))


def _run(graph, x):
    sess = _session(graph)
    return sess.run(None, {"input": x})[0]


def _check_graph(graph, size: int, where) -> np.ndarray:
    """Run the features graph on 3 random images and on each alone: same answers, shape (3, C)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 3, size, size)).astype(np.float32)
    try:
        sess = _session(graph)
        many = sess.run(None, {"input": x})[0]
        ones = np.concatenate([sess.run(None, {"input": x[i:i + 1]})[0] for i in range(3)])
    except Exception as e:
        op = re.search(r"running (\w+) node", str(e))
        detail = f"its {op.group(1)} fails on a batch of 3" if op else _first_line(e)
        raise ModelError(f"{where} does not run on a batch of several images ({detail}): its graph fixes the "
                         "batch size; re-export it with a dynamic batch axis") from None
    if many.ndim != 2 or many.shape[0] != 3 or not np.isfinite(many).all():
        raise ModelError(f"{where}: the features have shape {list(many.shape)} for 3 images; expected (3, C) "
                         "finite values")
    scale = max(1.0, float(np.abs(ones).max()))
    if float(np.abs(many - ones).max()) > 1e-3 * scale:
        raise ModelError(f"{where} gives other answers for a batch of 3 than for 3 batches of 1: its graph mixes "
                         "the images of a batch; re-export it with a dynamic batch axis")
    return many


def _looks_untrained(graph) -> bool:
    from onnx import numpy_helper

    inits = {i.name: i for i in graph.graph.initializer}
    biases = [inits[n.input[2]] for n in graph.graph.node
              if n.op_type == "Conv" and len(n.input) > 2 and n.input[2] in inits]
    if len(biases) < 3:
        return False
    return all(not np.any(numpy_helper.to_array(b)) for b in biases)


def save_atomic(model, out: Path, sidecar: dict) -> None:
    import onnx

    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=".part-", suffix=".onnx")
    os.close(fd)
    try:
        onnx.save(model, tmp)
        from retrain.files import write_json_atomic

        write_json_atomic(out.with_suffix(".json"), sidecar)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def safe_name(text: str) -> str:
    """A file-system-safe backbone name from a file name or URL."""
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(text)).strip("._") or "model"
    return stem[:80]
