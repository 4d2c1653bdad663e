"""Finding the features tensor of an ONNX image model, cutting the graph there, and checking the cut.

Part of retrain.onnx_backbone (its docstring says which tensor is taken and what the features
graph is): `find_candidates` walks back from each output to the last dense layer, `probe` runs
the model once to see a tensor's shape, `reduction` says how it becomes (N, C), `features_model`
builds the features graph (the nodes the tensor needs, the layout/colour adaptation in front,
the pooling behind) and `cut_and_verify` checks it against the model's own values and on a
batch of several images. A change here changes cached features graphs: bump
retrain.onnx_backbone.ONNX_SCHEMA.
"""

from __future__ import annotations

import os
import re

import numpy as np

from retrain.errors import ModelError

# Ops walked through from an output back to the last dense layer.
PASS_OPS = {"Softmax", "LogSoftmax", "Identity", "Sigmoid", "Flatten", "Reshape", "Squeeze", "Unsqueeze",
            "Cast", "Dropout", "Clip"}
AFFINE_OPS = {"Add", "Sub", "Mul", "Div"}  # with one constant operand: a bias, a temperature
DENSE_OPS = {"Gemm", "MatMul"}
MAX_WALK = 64


# ------------------------------------------------------------------------------ finding the tensor

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
    """The features graph (see retrain.onnx_backbone's docstring) of `model` cut at `tensor`.

    reduce: "" (tensor is (N, C)), "flatten" ((N, C, 1, 1) or (N, 1, 1, C)), "gap" (an NCHW map),
    "mean_nhwc" (an NHWC map)."""
    g = model.graph
    nodes = _needed(g, tensor, inp["name"])
    names = {o for n in nodes for o in n.output} | {i.name for i in g.initializer} | {inp["name"]}
    if "input" in names and inp["name"] != "input":
        raise ModelError("the model has a tensor named 'input' that is not its input; rename it to use the "
                         "model as a backbone")
    internal = _unique("retrain_model_input", names)
    pre = _adapt_input(inp["layout"], color, internal, names)
    body = [_rename_input(n, inp["name"], internal) for n in nodes]
    out = _unique("features", names)
    post = _pool_output(tensor, reduce, out, names, _opset(model))
    return _assemble(model, pre + body + post, body, out, size=size, tensor=tensor)


def _adapt_input(layout: str, color: str, internal: str, names: set) -> list:
    """Nodes from retrain's NCHW RGB `input` to what the model takes (BGR, NHWC), named `internal`."""
    from onnx import helper, numpy_helper

    pre, x = [], "input"
    if color == "BGR":
        idx = _unique("retrain_bgr_index", names)
        pre.append(helper.make_node("Constant", [], [idx], value=numpy_helper.from_array(
            np.array([2, 1, 0], np.int64), idx)))
        pre.append(helper.make_node("Gather", [x, idx], ["retrain_bgr"], axis=1, name="retrain_rgb_to_bgr"))
        x = "retrain_bgr"
    if layout == "NHWC":
        pre.append(helper.make_node("Transpose", [x], ["retrain_nhwc"], perm=[0, 2, 3, 1], name="retrain_to_nhwc"))
        x = "retrain_nhwc"
    pre.append(helper.make_node("Identity", [x], [internal], name="retrain_input"))
    return pre


def _pool_output(tensor: str, reduce: str, out: str, names: set, opset: int) -> list:
    """Nodes from `tensor` to the (N, C) features named `out` (see features_model's `reduce`)."""
    from onnx import helper, numpy_helper

    post, y = [], tensor
    if reduce == "gap":
        post.append(helper.make_node("GlobalAveragePool", [y], ["retrain_pooled"], name="retrain_pool"))
        post.append(helper.make_node("Flatten", ["retrain_pooled"], ["retrain_flat"], axis=1, name="retrain_flatten"))
        y = "retrain_flat"
    elif reduce == "mean_nhwc":
        if opset >= 18:
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
    post.append(helper.make_node("Identity", [y], [out], name="retrain_features"))
    return post


def _assemble(model, nodes: list, body: list, out: str, *, size: int, tensor: str):
    """The checked ModelProto of `nodes` with the initializers `body` reads, input `input`, output `out`."""
    import onnx
    from onnx import TensorProto, helper

    used = {i for n in body for i in n.input} | set().union(*[_subgraph_refs(n) for n in body] or [set()])
    inits = [i for i in model.graph.initializer if i.name in used]
    graph = helper.make_graph(
        nodes, "retrain_features",
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


def feature_width(value: np.ndarray, layout: str) -> int:
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


def cut_and_verify(model, inp: dict, tensor: str, *, size: int, color: str, where) -> tuple:
    """The features graph of `model` at `tensor`, checked on a batch of several images and against
    the model's own values: (graph, reduce, feature width)."""
    value = probe(model, inp, [tensor], size)[tensor]
    reduce = reduction(value, inp["layout"], tensor, where)
    graph = features_model(model, inp, tensor, reduce=reduce, size=size, color=color)
    feats = _check_graph(graph, size, where)
    ref = _reduce(value, reduce)
    if feats.shape[1] != ref.shape[1] or not np.allclose(_run(graph, np.zeros((1, 3, size, size), np.float32)),
                                                         ref, rtol=1e-3, atol=1e-4):
        raise ModelError(f"the features graph cut from {where} at '{tensor}' does not reproduce the model's own "
                         "values; choose another tensor with --bottleneck-tensor")
    return graph, reduce, int(feats.shape[1])


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


def looks_untrained(graph) -> bool:
    from onnx import numpy_helper

    inits = {i.name: i for i in graph.graph.initializer}
    biases = [inits[n.input[2]] for n in graph.graph.node
              if n.op_type == "Conv" and len(n.input) > 2 and n.input[2] in inits]
    if len(biases) < 3:
        return False
    return all(not np.any(numpy_helper.to_array(b)) for b in biases)
