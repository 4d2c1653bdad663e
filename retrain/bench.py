"""`retrain bench RUN [MODEL...]`: how fast and how big each form of a model is.

For the run's model and every form `retrain export` wrote from it (noted in RUN/exports.json),
plus any other run folders or .onnx files given: latency p50/p99 for one image, throughput at
a batch size, file size, parameters and multiply-accumulates (counted from the ONNX graph, as
the codelab's count_ops.py counted a TF graph's ops), and the accuracy the export measured.

Timing is the model alone (ONNX Runtime session.run on preprocessed photos), forms measured
interleaved (in a shuffled order each round) in one process so that the ratios survive a busy
machine. Medians of repeats.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from retrain.errors import ConfigError, ModelError, RetrainError

# ------------------------------------------------------------------------------ counting

_QDQ = ("QuantizeLinear", "DequantizeLinear")


def _dims(vi) -> list | None:
    t = vi.type.tensor_type
    if not t.HasField("shape"):
        return None
    d = [x.dim_value if x.HasField("dim_value") else None for x in t.shape.dim]
    return d if all(v is not None for v in d) else None


def _fix_batch(m, batch: int = 1) -> None:
    inits = {i.name for i in m.graph.initializer}
    for inp in m.graph.input:
        if inp.name in inits:
            continue
        dims = inp.type.tensor_type.shape.dim
        if len(dims) and not dims[0].HasField("dim_value"):
            dims[0].dim_value = batch


def _infer(m):
    """The model with as many intermediate shapes as ONNX (or ORT's symbolic) inference finds."""
    import onnx

    try:
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

        # SymbolicShapeInference.infer_shapes, minus its habit of saving a temp model into the
        # current folder when some shape stays unknown (those are probed below instead)
        s = SymbolicShapeInference(2**31 - 1, True, False, 0)
        s._preprocess(m)
        while s.run_:
            s._infer_impl()
        s._update_output_from_vi()
        return s.out_mp_
    except Exception:  # ops it does not know: plain ONNX inference
        return onnx.shape_inference.infer_shapes(m, data_prop=True)


def _probe_shapes(m, names: list[str]) -> dict:
    """Shapes of `names` by one ONNX Runtime run at batch 1 (for what static inference missed)."""
    import onnx
    import onnxruntime as ort
    from onnx import helper

    m2 = onnx.ModelProto()
    m2.CopyFrom(m)
    have = {o.name for o in m2.graph.output}
    for n in names:
        if n not in have:
            m2.graph.output.append(helper.make_empty_tensor_value_info(n))
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    s = ort.InferenceSession(m2.SerializeToString(), so, providers=["CPUExecutionProvider"])
    inits = {i.name for i in m2.graph.initializer}
    feed = {}
    for i in s.get_inputs():
        if i.name in inits:
            continue
        shape = [d if isinstance(d, int) else 1 for d in i.shape]
        dtype = {"tensor(float)": np.float32, "tensor(float16)": np.float16,
                 "tensor(uint8)": np.uint8, "tensor(int64)": np.int64}.get(i.type, np.float32)
        feed[i.name] = np.zeros(shape, dtype)
    outs = s.run(names, feed)
    return {n: list(o.shape) for n, o in zip(names, outs)}


def count_graph(path) -> dict:
    """{"macs", "params", "macs_by_op"} of an ONNX model for one image.

    MACs: Conv = out elements x (in channels / groups) x kernel area; MatMul/Gemm = out elements
    x inner dimension; the quantized forms (QLinearConv, QGemm, ConvInteger, MatMulInteger...)
    count the same way, so every form of a model reports the same MACs. Params: elements of the
    weight and bias tensors (not quantization scales, zero points or shape constants).
    """
    import onnx
    m = onnx.load(str(path))
    _fix_batch(m)
    inits = {i.name: list(i.dims) for i in m.graph.initializer}
    init_types = {i.name: i.data_type for i in m.graph.initializer}
    for n in m.graph.node:  # weights held in Constant nodes count as initializers
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            t = n.attribute[0].t
            inits[n.output[0]] = list(t.dims)
            init_types[n.output[0]] = t.data_type
    mi = _infer(m)
    shapes = {vi.name: _dims(vi) for vi in [*mi.graph.value_info, *mi.graph.output, *mi.graph.input]}
    shapes.update(inits)
    producer = {o: n for n in m.graph.node for o in n.output}

    def weight_shape(name):
        # through DequantizeLinear / Cast / Transpose-free chains to the stored tensor
        seen = 0
        while name not in inits and name in producer and seen < 4:
            p = producer[name]
            if p.op_type not in ("DequantizeLinear", "Cast", "Identity"):
                break
            name, seen = p.input[0], seen + 1
        return inits.get(name) or shapes.get(name)

    mac_ops = {"Conv": (0, 1), "ConvInteger": (0, 1), "QLinearConv": (0, 3), "MatMul": (0, 1),
               "MatMulInteger": (0, 1), "QLinearMatMul": (0, 3), "Gemm": (0, 1), "QGemm": (0, 3),
               "ConvTranspose": (0, 1)}
    nodes = [n for n in m.graph.node if n.op_type in mac_ops]
    missing = [n.output[0] for n in nodes if not shapes.get(n.output[0])]
    if missing:
        try:
            shapes.update(_probe_shapes(m, missing))
        except Exception as e:
            raise ModelError(f"{path}: cannot work out its layer shapes to count MACs ({str(e)[:160]})") from None
    macs_by_op: dict[str, int] = {}
    for n in nodes:
        xi, wi = mac_ops[n.op_type]
        out = shapes.get(n.output[0])
        w = weight_shape(n.input[wi]) if len(n.input) > wi else None
        if out and w:
            mac = _node_macs(n, out, w, shapes.get(n.input[xi]) or weight_shape(n.input[xi]))
            macs_by_op[n.op_type] = macs_by_op.get(n.op_type, 0) + mac
    return {"macs": int(sum(macs_by_op.values())), "params": _count_params(m, inits, init_types),
            "macs_by_op": macs_by_op}


def _node_macs(n, out, w, a) -> int:
    """Multiply-accumulates of one Conv/MatMul/Gemm-like node: output, weight, input shapes."""
    import onnx

    if n.op_type in ("Conv", "ConvInteger", "QLinearConv"):
        return int(np.prod(out)) * int(np.prod(w[1:]))
    if n.op_type == "ConvTranspose":
        return int(np.prod(a or [0])) * int(np.prod(w[1:]))
    if n.op_type in ("Gemm", "QGemm"):
        attrs = {at.name: onnx.helper.get_attribute_value(at) for at in n.attribute}
        return int(np.prod(out)) * int(w[1] if attrs.get("transB", 0) else w[0])
    # MatMul family: inner dimension is the second-last of B (or the only one)
    return int(np.prod(out)) * int(w[-2] if len(w) >= 2 else w[0])


def _count_params(m, inits: dict, init_types: dict) -> int:
    """Elements of weight and bias tensors, not quantization scales, zero points or shapes."""
    import onnx

    # params: tensors that are not scales/zero points (inputs >= 1 of Q/DQ, or the QLinear* ones)
    not_params = set()
    for n in m.graph.node:
        if n.op_type in _QDQ:
            not_params.update(n.input[1:])
        elif n.op_type.startswith("QLinear") or n.op_type == "QGemm":
            w_idx = 3 if n.op_type in ("QLinearConv", "QLinearMatMul", "QGemm") else None
            bias_idx = {"QLinearConv": 8, "QGemm": 6}.get(n.op_type)
            not_params.update(x for j, x in enumerate(n.input) if j not in (0, w_idx, bias_idx))
    # weights stored int8 then dequantized: count the stored tensor, not a scale
    float_like = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.INT8,
                  onnx.TensorProto.UINT8, onnx.TensorProto.INT32, onnx.TensorProto.DOUBLE,
                  onnx.TensorProto.BFLOAT16}
    consumers = {x for n in m.graph.node for x in n.input}
    return int(sum(int(np.prod(d)) for name, d in inits.items()
                   if name in consumers and name not in not_params and init_types.get(name) in float_like
                   and int(np.prod(d)) > 1))


# ------------------------------------------------------------------------------ timing

def find_forms(run, extra=(), *, exports: bool = True) -> list[Path]:
    """The model files to bench: RUN's, each export noted in RUN/exports.json, then `extra`."""
    from retrain.model import resolve_model_path
    from retrain.run import Run

    paths = [resolve_model_path(run)]
    if exports and Path(run).is_dir():
        paths += [resolve_model_path(d) for d in Run(run).export_folders().values()]
    paths += [resolve_model_path(x) for x in extra]
    out, seen = [], set()
    for p in paths:
        if p.resolve() not in seen:
            seen.add(p.resolve())
            out.append(p)
    return out


def sample_images(model_path: Path, clf, n: int) -> tuple[np.ndarray, str]:
    """n uint8 photos in the model's input size: the run's validation photos where the run says
    where they are, else deterministic random pixels (timing does not depend on content)."""
    run = model_path.parent
    try:
        from retrain.run import Run

        split = Run(run).split()
        root = Run(run).image_root()
        rel = (split["files"].get("validation") or []) + (split["files"].get("test") or [])
        imgs = []
        for r in rel:
            if len(imgs) >= n:
                break
            try:
                imgs.append(clf.load_image(str(root / r)))
            except Exception:
                continue
        if imgs:
            while len(imgs) < n:
                imgs += imgs[: n - len(imgs)]
            return np.stack(imgs[:n]), "photos"
    except (RetrainError, OSError, ValueError, KeyError, TypeError):
        pass  # not a run folder with its photos: random pixels time the model as well
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (n, clf.height, clf.width, 3), dtype=np.uint8), "random pixels"


def bench(run, extra=(), *, provider: str = "auto", batch: int = 32, threads: int | None = None,
          single_runs: int = 100, batch_runs: int = 10, exports: bool = True, quiet: bool = True, log=None) -> dict:
    """Latency, throughput, size, params and MACs of each form (see module doc). JSON-ready."""
    from retrain import images
    from retrain.classifier import Classifier
    from retrain.progress import bar
    from retrain.runtime import session_provider

    log = log or (lambda m: None)
    if not 1 <= batch <= 1024:
        raise ConfigError(f"--batch must be between 1 and 1024, got {batch}")
    if not 1 <= single_runs <= 100000 or not 1 <= batch_runs <= 10000:
        raise ConfigError("--runs must be at least 1 (and at most 100000)")
    if threads is not None and not 1 <= threads <= 1024:
        raise ConfigError(f"--threads must be between 1 and 1024, got {threads}")
    paths = find_forms(run, extra, exports=exports)
    forms = []
    for p in paths:
        clf = Classifier(p, provider=provider, threads=threads)
        X, source = sample_images(p, clf, batch)
        x = images.normalize(X, clf.mean, clf.std)  # (batch, 3, H, W) float32
        meta = clf.meta
        agree = (meta.get("agreement") or {}).get("test") or {}
        test_acc = agree.get("accuracy", ((meta.get("metrics") or {}).get("test") or {}).get("accuracy"))
        counts = count_graph(p)
        fmt = meta.get("format", "onnx")
        name = fmt if meta.get("exported_from") else f"{fmt} (run)" if p == paths[0] else fmt
        q = meta.get("quantization") or {}
        if q and (q.get("quant_format", "qdq") != "qdq" or not q.get("per_channel", True)):
            name += f" ({q.get('quant_format')}{'' if q.get('per_channel', True) else ', per-tensor'})"
        forms.append({"model": str(p), "form": name, "format": fmt, "clf": clf, "x": x,
                      "input": source, "size_bytes": p.stat().st_size, **counts,
                      "test_accuracy": test_acc, "test_n": agree.get("n", ((meta.get("metrics") or {}).get("test") or {}).get("n")),
                      "test_change_points": agree.get("change_points"),
                      "max_prob_diff": agree.get("max_prob_diff"),
                      "provider": session_provider(clf.session)})

    def run_once(f, xb):
        f["clf"].session.run([f["clf"].output_name], {f["clf"].input_name: xb})

    for f in forms:  # warm up: first runs allocate, TensorRT builds (or loads) its engine
        run_once(f, f["x"])
        for _ in range(3):
            run_once(f, f["x"][:1])
    lat = {id(f): [] for f in forms}
    tput = {id(f): [] for f in forms}
    total = len(forms) * (single_runs + batch_runs)
    rng = np.random.default_rng(0)

    def shuffled():  # a fresh order each round: no form always runs first (or right after another)
        return [forms[i] for i in rng.permutation(len(forms))]

    with bar(total=total, desc="Benchmarking", unit="run", quiet=quiet) as pbar:
        for _ in range(single_runs):  # interleaved: a busy moment hits every form alike
            for f in shuffled():
                t = time.perf_counter()
                run_once(f, f["x"][:1])
                lat[id(f)].append((time.perf_counter() - t) * 1000)
            pbar.update(len(forms))
        for _ in range(batch_runs):
            for f in shuffled():
                t = time.perf_counter()
                run_once(f, f["x"])
                tput[id(f)].append(batch / (time.perf_counter() - t))
            pbar.update(len(forms))
    base = None
    rows = []
    for f in forms:
        row = {k: v for k, v in f.items() if k not in ("clf", "x")}
        row["latency_ms_p50"] = round(float(np.percentile(lat[id(f)], 50)), 3)
        row["latency_ms_p99"] = round(float(np.percentile(lat[id(f)], 99)), 3)
        row["throughput_img_s"] = round(float(np.median(tput[id(f)])), 2)
        if base is None:
            base = row
        row["speedup"] = round(row["throughput_img_s"] / base["throughput_img_s"], 3)
        row["latency_speedup"] = round(base["latency_ms_p50"] / row["latency_ms_p50"], 3)
        rows.append(row)
    return {"machine": machine_description(), "provider": provider, "batch": batch,
            "threads": threads or os.cpu_count(), "single_runs": single_runs, "batch_runs": batch_runs,
            "forms": rows}


def machine_description() -> str:
    from retrain.runtime import cpu_flags, cpu_name

    isa = [f for f in ("avx2", "avx512f", "avx512_vnni", "amx_int8", "amx_bf16") if f in cpu_flags()]
    cpu = f"{cpu_name()} ({os.cpu_count()} cores{'; ' + ', '.join(isa) if isa else ''})"
    import onnxruntime as ort

    return f"{cpu}; onnxruntime {ort.__version__}"


def format_table(res: dict) -> str:
    lines = [f"{res['machine']}; provider {res['provider']}, batch {res['batch']}, {res['threads']} threads",
             f"{'form':<26} {'provider':<8} {'p50 ms':>8} {'p99 ms':>8} {'img/s':>8} {'x fp32':>6} "
             f"{'size MB':>8} {'params':>10} {'MACs':>8} {'test acc':>9} {'change':>8}"]
    for r in res["forms"]:
        acc = f"{r['test_accuracy']:.2%}" if r.get("test_accuracy") is not None else "-"
        ch = f"{r['test_change_points']:+.2f}pt" if r.get("test_change_points") is not None else "-"
        lines.append(f"{r['form']:<26} {r['provider']:<8} {r['latency_ms_p50']:>8.2f} {r['latency_ms_p99']:>8.2f} "
                     f"{r['throughput_img_s']:>8.1f} {r['speedup']:>6.2f} {r['size_bytes'] / 1e6:>8.2f} "
                     f"{r['params'] / 1e6:>9.2f}M {r['macs'] / 1e6:>7.0f}M {acc:>9} {ch:>8}")
    lines.append("timings: model only (preprocessed input), medians of interleaved repeats; "
                 "accuracy: the run's test photos, as measured by `retrain export`")
    return "\n".join(lines)


def add_arguments(p) -> None:
    p.add_argument("run", help="run folder (or model.onnx); its exports are benched too")
    p.add_argument("models", nargs="*", metavar="MODEL", help="more run folders or .onnx files to compare")
    p.add_argument("--provider", default="auto", help="auto, cpu, cuda or tensorrt (default auto)")
    p.add_argument("--batch", type=int, default=32, help="batch size for throughput (default 32)")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: all cores)")
    p.add_argument("--runs", type=int, default=100, help="single-image runs for latency (default 100)")
    p.add_argument("--batch-runs", type=int, default=10, help="batch runs for throughput (default 10)")
    p.add_argument("--no-exports", action="store_true", help="only the models named, not RUN's exports")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def main(args) -> int:
    from retrain.progress import print_json

    res = bench(args.run, args.models, provider=args.provider, batch=args.batch, threads=args.threads,
                single_runs=args.runs, batch_runs=args.batch_runs, exports=not args.no_exports,
                quiet=args.quiet or args.json)
    if args.json:
        print_json(res)
    else:
        print(format_table(res))
    return 0
