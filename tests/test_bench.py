"""`retrain bench`: MACs and params counted right (checked on a graph small enough to count by
hand, float and quantized), and the CLI times every form of a run."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import run_cli
from retrain.bench import count_graph


def _toy(path):
    """input (N,3,8,8) -> Conv 3->4, 3x3, pad 1 -> Relu -> Flatten -> Gemm 256->5 -> Softmax."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.normal(0, 0.3, (4, 3, 3, 3)).astype(np.float32), "w")
    b = numpy_helper.from_array(np.zeros(4, np.float32), "b")
    fw = numpy_helper.from_array(rng.normal(0, 0.1, (256, 5)).astype(np.float32), "fw")
    fb = numpy_helper.from_array(np.zeros(5, np.float32), "fb")
    nodes = [helper.make_node("Conv", ["input", "w", "b"], ["c"], pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Flatten", ["r"], ["f"]),
             helper.make_node("Gemm", ["f", "fw", "fb"], ["logits"]),
             helper.make_node("Softmax", ["logits"], ["final_result"], axis=-1)]
    g = helper.make_graph(nodes, "toy", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 8, 8])],
                          [helper.make_tensor_value_info("final_result", TensorProto.FLOAT, ["N", 5])],
                          [w, b, fw, fb])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(m, str(path))
    return path


TOY_MACS = 4 * 8 * 8 * (3 * 3 * 3) + 256 * 5  # conv: out elements x kernel volume; gemm: out x inner
TOY_PARAMS = 4 * 3 * 3 * 3 + 4 + 256 * 5 + 5


def test_count_graph_by_hand(tmp_path):
    c = count_graph(_toy(tmp_path / "toy.onnx"))
    assert c["macs"] == TOY_MACS == 8192
    assert c["params"] == TOY_PARAMS
    assert c["macs_by_op"] == {"Conv": 6912, "Gemm": 1280}


@pytest.mark.parametrize("fmt", ["QDQ", "QOperator"])
def test_quantized_forms_count_the_same(tmp_path, fmt):
    from onnxruntime import quantization as Q

    src = _toy(tmp_path / "toy.onnx")
    rng = np.random.default_rng(1)

    class Reader(Q.CalibrationDataReader):
        def __init__(self):
            self.data = iter([{"input": rng.normal(0, 1, (2, 3, 8, 8)).astype(np.float32)} for _ in range(3)])

        def get_next(self):
            return next(self.data, None)

    dst = tmp_path / f"toy-{fmt}.onnx"
    Q.quantize_static(str(src), str(dst), Reader(), quant_format=getattr(Q.QuantFormat, fmt), per_channel=True)
    ops = {n.op_type for n in onnx.load(str(dst)).graph.node}
    assert ("QLinearConv" in ops) if fmt == "QOperator" else ("DequantizeLinear" in ops)
    c = count_graph(dst)
    assert c["macs"] == TOY_MACS
    assert c["params"] == TOY_PARAMS


def test_the_default_model_counts_its_two_networks_and_the_head(tiny_run):
    from retrain.architectures import get_backbone
    from retrain.features import features_onnx

    c = count_graph(tiny_run / "model.onnx")
    lite0, lite1 = get_backbone("efficientnet_lite0+efficientnet_lite1").members
    c0, c1 = count_graph(features_onnx(lite0)), count_graph(features_onnx(lite1))
    # EfficientNet-Lite0 (BN folded): ~3.4M params, ~0.39 GMACs at 224x224
    assert 3.3e6 < c0["params"] < 3.5e6 and 3.7e8 < c0["macs"] < 4.1e8
    # ... then Lite1 at the same 224 px, and the 2560x3 head
    head = 2560 * 3  # weights of the 3-class head (the model also holds its novelty score's few tensors)
    assert c0["params"] + c1["params"] + head < c["params"] < c0["params"] + c1["params"] + 64 * 2560
    assert c0["macs"] + c1["macs"] + head <= c["macs"] < c0["macs"] + c1["macs"] + 64 * 2560


@pytest.mark.slow
def test_bench_cli_times_every_form(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    run_cli("export", run, "-f", "onnx-fp16", "-o", tmp_path / "fp16", "-q")
    p = run_cli("bench", run, "--json", "--runs", "3", "--batch-runs", "2", "--batch", "4", "--provider", "cpu")
    res = json.loads(p.stdout)
    forms = {r["form"]: r for r in res["forms"]}
    assert set(forms) == {"onnx (run)", "onnx-fp16"}
    a, b = forms["onnx (run)"], forms["onnx-fp16"]
    assert a["speedup"] == 1.0 and a["provider"] == "cpu" and res["batch"] == 4
    assert a["macs"] == b["macs"] > 3e8 and a["params"] == b["params"]
    assert b["size_bytes"] < 0.6 * a["size_bytes"]
    for r in (a, b):
        assert 0 < r["latency_ms_p50"] <= r["latency_ms_p99"] and r["throughput_img_s"] > 0
        assert r["input"] == "photos"
    assert b["test_accuracy"] is not None and b["max_prob_diff"] is not None
    table = run_cli("bench", run, "--runs", "2", "--batch-runs", "1", "--batch", "2", "-q").stdout
    assert "onnx-fp16" in table and "p50 ms" in table and "MACs" in table


def test_bench_a_bare_model_file_and_bad_flags(tiny_run, tmp_path):
    shutil.copy(tiny_run / "model.onnx", tmp_path / "m.onnx")
    res = json.loads(run_cli("bench", tmp_path / "m.onnx", "--json", "--runs", "2", "--batch-runs", "1",
                             "--batch", "2").stdout)
    assert len(res["forms"]) == 1 and res["forms"][0]["input"] == "random pixels"
    p = run_cli("bench", tiny_run, "--batch", "0", check=False)
    assert p.returncode == 2 and p.stderr.strip().startswith("error: --batch must be between 1")
