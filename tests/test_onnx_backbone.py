"""Any ONNX image model as the backbone (retrain.onnx_backbone): the models are built here (the
onnx helper, and EfficientNet-Lite0 with its ImageNet head exported through torch), never
downloaded. Real files, real ONNX Runtime, the real CLI."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import EXAMPLES, make_dataset, one_error_line, run_cli
from retrain.architectures import get_backbone
from retrain.features import features_onnx
from retrain.errors import ConfigError, ModelError

# The README's "Using the model without retrain", for a model whose mean/std are one per channel.
README_SNIPPET = '''
import json, numpy as np, onnxruntime as ort
from PIL import Image

sess = ort.InferenceSession(MODEL)
meta = sess.get_modelmeta().custom_metadata_map
labels, size = json.loads(meta["labels"]), int(meta["input_size"])
mean, std = np.float32(json.loads(meta["mean"])), np.float32(json.loads(meta["std"]))  # a number or R, G, B
crop = float(meta["crop_fraction"])
im = Image.open(PHOTO).convert("RGB")
w, h = im.size; s = min(w, h) * crop
im = im.resize((size, size), Image.BICUBIC, box=((w - s) / 2, (h - s) / 2, (w + s) / 2, (h + s) / 2))
x = ((np.asarray(im, np.float32) - mean) / std).transpose(2, 0, 1)[None]
probs = sess.run(["final_result"], {"input": x})[0][0]
print(labels[probs.argmax()], probs.max())
'''


# ------------------------------------------------------------------------------ models built here

def _f32(name, arr):
    return numpy_helper.from_array(np.asarray(arr, np.float32), name)


def tiny_classifier(path, *, layout="NCHW", size=32, dynamic_size=False, classes=5, channels=8, meta=None,
                    fixed_batch=False, two_heads=False, near_twins=False, seed=0):
    """A small random image classifier: [Transpose] -> Conv 3x3 -> Relu -> GlobalAveragePool ->
    Flatten -> Gemm -> Softmax (tf2onnx-style NHWC input with layout="NHWC"). two_heads: a second
    branch with its own pooled tensor (16 wide) and MatMul head; near_twins: the output is the
    difference of two nearly equal branches (fine in fp32, lost by int8)."""
    rng = np.random.default_rng(seed)
    hw = ["H", "W"] if dynamic_size else [size, size]
    batch = 1 if fixed_batch else "N"
    shape = [batch, 3, *hw] if layout == "NCHW" else [batch, *hw, 3]
    nodes, inits, outs, src = [], [], [], "image"
    if layout == "NHWC":
        nodes.append(helper.make_node("Transpose", ["image"], ["nchw"], perm=[0, 3, 1, 2]))
        src = "nchw"

    def branch(tag, c, w, b):
        inits.extend([_f32(f"{tag}_w", w), _f32(f"{tag}_b", b)])
        nodes.append(helper.make_node("Conv", [src, f"{tag}_w", f"{tag}_b"], [f"{tag}_conv"], pads=[1, 1, 1, 1],
                                      kernel_shape=[3, 3]))
        nodes.append(helper.make_node("Relu", [f"{tag}_conv"], [f"{tag}_relu"]))
        nodes.append(helper.make_node("GlobalAveragePool", [f"{tag}_relu"], [f"{tag}_gap"]))
        if fixed_batch:  # an exporter that baked batch 1 into a Reshape
            inits.append(numpy_helper.from_array(np.array([1, c], np.int64), f"{tag}_shape"))
            nodes.append(helper.make_node("Reshape", [f"{tag}_gap", f"{tag}_shape"], [f"{tag}_pooled"]))
        else:
            nodes.append(helper.make_node("Flatten", [f"{tag}_gap"], [f"{tag}_pooled"], axis=1))
        return f"{tag}_pooled"

    w, b = rng.standard_normal((channels, 3, 3, 3)) * 0.3, rng.standard_normal(channels) * 0.1
    feat = branch("a", channels, w, b)
    if near_twins:
        nodes.append(helper.make_node("Sub", [feat, branch("b", channels, w + 1e-3, b)], ["diff"]))
        outs.append(helper.make_tensor_value_info("diff", TensorProto.FLOAT, [batch, channels]))
    else:
        inits.extend([_f32("fc_w", rng.standard_normal((classes, channels))),
                      _f32("fc_b", rng.standard_normal(classes))])
        nodes.append(helper.make_node("Gemm", [feat, "fc_w", "fc_b"], ["logits"], transB=1))
        nodes.append(helper.make_node("Softmax", ["logits"], ["probs"], axis=1))
        outs.append(helper.make_tensor_value_info("probs", TensorProto.FLOAT, [batch, classes]))
    if two_heads:
        c2 = channels * 2
        feat2 = branch("b", c2, rng.standard_normal((c2, 3, 3, 3)) * 0.3, rng.standard_normal(c2) * 0.1)
        inits.append(_f32("aux_w", rng.standard_normal((c2, classes))))
        nodes.append(helper.make_node("MatMul", [feat2, "aux_w"], ["aux_logits"]))
        outs.append(helper.make_tensor_value_info("aux_logits", TensorProto.FLOAT, [batch, classes]))
    g = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("image", TensorProto.FLOAT, shape)], outs,
                          inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    for k, v in (meta or {}).items():
        e = m.metadata_props.add()
        e.key, e.value = k, v
    onnx.checker.check_model(m)
    onnx.save(m, str(path))
    return path


def run_original(path, x, tensor):
    """The value of `tensor` in the original model on input x (its own layout)."""
    import onnxruntime as ort

    m = onnx.load(str(path))
    m.graph.output.append(helper.make_tensor_value_info(tensor, TensorProto.FLOAT, None))
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run([tensor], {m.graph.input[0].name: x})[0]


def features(bb, x):
    from retrain.bottlenecks import feature_session

    return feature_session(bb, provider="cpu", precision="fp32")(x)


@pytest.fixture(scope="session")
def lite0_classifier(tmp_path_factory):
    """EfficientNet-Lite0 exported with its ImageNet classifier through torch, as a user would
    export a torchvision/timm model; its metadata gives the Lite preprocessing (127, 128)."""
    from retrain.features import export_classifier

    return export_classifier(get_backbone("efficientnet_lite0"),
                             tmp_path_factory.mktemp("lite0cls") / "lite0_classifier.onnx")


@pytest.fixture(scope="module")
def nhwc_model(tmp_path_factory):
    """A Keras-style (tf2onnx) classifier: NHWC input, per-channel mean/std in its metadata."""
    return tiny_classifier(tmp_path_factory.mktemp("nhwc") / "keras_net.onnx", layout="NHWC", size=32,
                           meta={"mean": "[120, 110, 100]", "std": "[60, 55, 50]"})


# ------------------------------------------------------------------------------ the cut

@pytest.mark.slow
def test_a_torch_classifier_is_cut_at_the_pooled_1280_features_equal_to_built_in_lite0(lite0_classifier):
    bb = get_backbone(str(lite0_classifier))
    lite = get_backbone("efficientnet_lite0")
    assert bb.kind == "onnx" and bb.feature_dim == 1280 and bb.image_size == lite.image_size  # exported at 288
    assert "1280 wide, the input of the final Gemm" in bb.description and bb.tensor in bb.description
    # mean, std and size from the metadata; the crop is the ONNX default (0.875), lite0's is size / (size + 32)
    assert {**bb.preprocessing(), "crop_fraction": None} == {**lite.preprocessing(), "crop_fraction": None}
    from retrain import images

    photos = sorted(EXAMPLES.glob("*/*.jpg"))[:12]
    x = images.normalize(np.stack([images.load(str(p), lite.image_size, lite.crop_fraction) for p in photos]), 127.0, 128.0)
    got, ref = features(bb, x), features(lite, x)
    # Same weights, same photos: GlobalAveragePool + Gemm input against retrain's ReduceMean export.
    # Tolerance: 1e-3 absolute on features of magnitude ~5 (float32 summation order only).
    assert np.abs(got - ref).max() < 1e-3
    assert np.abs(ref).max() > 1.0


def test_nhwc_model_with_per_channel_stats_is_adapted_inside_the_graph(nhwc_model):
    bb = get_backbone(str(nhwc_model))
    assert bb.layout == "NHWC" and bb.feature_dim == 8 and bb.image_size == 32
    assert bb.mean == (120.0, 110.0, 100.0) and bb.std == (60.0, 55.0, 50.0)
    assert "from the model's metadata" in bb.description and "NHWC" in bb.description
    x = np.random.default_rng(1).standard_normal((4, 3, 32, 32)).astype(np.float32)  # retrain's NCHW input
    want = run_original(nhwc_model, np.ascontiguousarray(x.transpose(0, 2, 3, 1)), "a_pooled")
    np.testing.assert_allclose(features(bb, x), want, rtol=1e-5, atol=1e-5)
    g = onnx.load(str(features_onnx(bb))).graph
    assert [d.dim_value or d.dim_param for d in g.input[0].type.tensor_type.shape.dim] == ["N", 3, 32, 32]


def test_bgr_model_gets_its_channels_reversed(tmp_path):
    path = tiny_classifier(tmp_path / "caffe_net.onnx", meta={"color": "BGR"})
    bb = get_backbone(str(path))
    assert bb.color == "BGR"
    x = np.random.default_rng(2).standard_normal((2, 3, 32, 32)).astype(np.float32)
    want = run_original(path, np.ascontiguousarray(x[:, ::-1]), "a_pooled")
    np.testing.assert_allclose(features(bb, x), want, rtol=1e-5, atol=1e-5)


def test_two_candidate_tensors_need_bottleneck_tensor(tmp_path):
    path = tiny_classifier(tmp_path / "two_heads.onnx", two_heads=True)
    with pytest.raises(ConfigError) as e:
        get_backbone(str(path))
    msg = str(e.value)
    assert "2 candidate feature tensors" in msg and "'a_pooled' (8 wide" in msg and "'b_pooled' (16 wide" in msg
    assert "--bottleneck-tensor" in msg
    assert get_backbone(str(path), tensor="b_pooled").feature_dim == 16
    assert get_backbone(str(path), tensor="a_gap").feature_dim == 8  # (N, 8, 1, 1): flattened
    assert get_backbone(str(path), tensor="a_relu").reduce == "gap"  # a feature map: pooled
    with pytest.raises(ConfigError, match="Did you mean 'b_pooled'"):
        get_backbone(str(path), tensor="b_pooledd")
    data = make_dataset(tmp_path / "images")
    p = run_cli("fit", data, "-o", tmp_path / "run", "--architecture", path, check=False)
    assert p.returncode == 2 and "--bottleneck-tensor" in one_error_line(p.stderr)


def test_dynamic_input_size_takes_the_flags_or_the_stated_default(tmp_path):
    path = tiny_classifier(tmp_path / "dynamic.onnx", dynamic_size=True)
    bb = get_backbone(str(path))
    assert bb.image_size == 224 and "224x224 (by default" in bb.description
    assert "ImageNet defaults" in bb.description
    small = get_backbone(str(path), height=48, width=48, mean="127.5", std="127.5")
    assert small.image_size == 48 and small.mean == 127.5 and small.fingerprint() != bb.fingerprint()
    with pytest.raises(ConfigError, match="square"):
        get_backbone(str(path), height=48, width=64)
    with pytest.raises(ConfigError, match="--input_mean expects a number or three"):
        get_backbone(str(path), mean="1,2")


def test_the_cache_is_keyed_by_the_file_and_its_preprocessing(tmp_path):
    a = get_backbone(str(tiny_classifier(tmp_path / "net.onnx", seed=0)))
    b = get_backbone(str(tiny_classifier(tmp_path / "net.onnx", seed=1)))  # same name, other weights
    assert a.sha256 != b.sha256 and a.fingerprint() != b.fingerprint()
    c = get_backbone(str(tmp_path / "net.onnx"), std="10")
    assert c.fingerprint() != b.fingerprint() and features_onnx(c) != features_onnx(b)
    info = json.loads(features_onnx(b).with_suffix(".json").read_text())
    assert info["sha256"] == b.sha256 and info["tensor"] == "a_pooled" and info["fingerprint"] == b.fingerprint()


@pytest.mark.parametrize("case", ["garbage", "text", "not_image", "fixed_batch", "missing"])
def test_broken_or_non_image_files_are_one_line_errors(tmp_path, case):
    path = tmp_path / f"{case}.onnx"
    if case == "garbage":
        path.write_bytes(b"\x08\x07\x12\xff\xfe" + bytes(range(256)) * 4)
        want = "is not an ONNX model"
    elif case == "text":
        path.write_text("this is not a model\n")
        want = "is not an ONNX model"
    elif case == "not_image":
        g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "tabular",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 10])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])],
                              [_f32("w", np.ones((10, 2)))])
        onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))
        want = "is not an image model: its input 'x' has shape [?, 10]"
    elif case == "fixed_batch":
        tiny_classifier(path, fixed_batch=True)
        want = "fixes the batch size; re-export it with a dynamic batch axis"
    else:
        want = "backbone model not found"
    with pytest.raises((ModelError, ConfigError), match=want.replace("[", r"\[").replace("?", r"\?")):
        get_backbone(str(path))
    data = make_dataset(tmp_path / "images")
    p = run_cli("fit", data, "-o", tmp_path / "run", "--architecture", path, check=False)
    assert p.returncode == 2 and want in one_error_line(p.stderr)
    assert not (tmp_path / "run").exists()


def test_flags_for_onnx_backbones_are_refused_for_built_in_ones():
    with pytest.raises(ConfigError, match="--input_mean apply to a backbone from an ONNX model"):
        get_backbone("efficientnet_lite0", mean="127")


def test_fine_tune_is_refused_on_a_foreign_onnx_backbone(tmp_path, nhwc_model):
    data = make_dataset(tmp_path / "images")
    p = run_cli("fit", data, "-o", tmp_path / "run", "--architecture", nhwc_model, "--fine-tune", check=False)
    line = one_error_line(p.stderr)
    assert p.returncode == 2 and "only the head is trained on it: drop --fine-tune" in line


def test_int8_that_cannot_keep_the_features_falls_back_to_fp32_in_one_line(tmp_path, capsys):
    from retrain.bottlenecks import plan_backbone
    from retrain.config import FitConfig
    from retrain.progress import Log

    path = tiny_classifier(tmp_path / "twins.onnx", near_twins=True)  # int8 loses the tiny difference
    cfg = FitConfig(image_dir=str(tmp_path), architecture=str(path), bottleneck_precision="int8")
    _bb, precision = plan_backbone(cfg, "int8", log=Log())
    assert precision == "fp32"
    notes = [line for line in capsys.readouterr().err.splitlines() if "int8 bottlenecks are not available" in line]
    assert len(notes) == 1 and "disagree with fp32" in notes[0] and "computing them in fp32" in notes[0]
    ok = tiny_classifier(tmp_path / "plain.onnx")  # one int8 keeps: int8 it is
    assert plan_backbone(FitConfig(image_dir=str(tmp_path), architecture=str(ok)), "int8")[1] == "int8"


# ------------------------------------------------------------------------------ the whole tool

@pytest.mark.slow
def test_nhwc_backbone_trains_labels_and_runs_in_plain_onnxruntime(tmp_path, nhwc_model, tiny_run, capsys):
    from retrain.classifier import Classifier

    data = make_dataset(tmp_path / "images", per_class=8)
    run = tmp_path / "run"
    p = run_cli("fit", data, "-o", run, "--architecture", nhwc_model, "--bottleneck-tensor", "a_pooled")
    assert "Backbone keras_net.onnx: features 'a_pooled' (8 wide" in p.stderr
    rep = json.loads((run / "report.json").read_text())
    assert rep["architecture"] == "keras_net.onnx" and rep["backbone"]["kind"] == "onnx"
    assert rep["backbone"]["mean"] == [120.0, 110.0, 100.0] and rep["backbone"]["model_layout"] == "NHWC"
    clf = Classifier(run, provider="cpu")
    assert clf.meta["mean"] == [120.0, 110.0, 100.0] and clf.meta["input_size"] == 32
    photo = data / "circle" / "circle_0.jpg"
    want = clf.classify([str(photo)], top_k=1)[0]
    # The model is self-contained: it runs from another folder, without retrain's cache.
    alone = tmp_path / "elsewhere" / "model.onnx"
    alone.parent.mkdir()
    shutil.copy(run / "model.onnx", alone)
    exec(README_SNIPPET, {"MODEL": str(alone), "PHOTO": str(photo)})
    label, score = capsys.readouterr().out.split()
    top = want["predictions"][0]  # the snippet prints the arg max (no "unknown" threshold)
    assert label == top["label"] and float(score) == pytest.approx(top["score"], abs=1e-4)
    lab = json.loads(run_cli("label", run, photo, "--json").stdout)
    assert lab[0]["label"] == want["label"]
    # Runs of different backbones side by side.
    from retrain.compare import compare, format_table

    rows = compare([tiny_run, run])
    head, _, *lines = format_table(rows).splitlines()
    assert "architecture" in head and "img/s" in head and "MB" in head
    default = "efficientnet_lite0+efficientnet_lite1"  # tiny_run's backbone
    assert any("keras_net.onnx" in r for r in lines) and any(default in r for r in lines)
    mb = {r["architecture"]: r["model_mb"] for r in rows}
    assert mb["keras_net.onnx"] < 0.1 < mb[default]
    assert {r["architecture"]: r["feature_dim"] for r in rows} == {"keras_net.onnx": 8, default: 2560}


@pytest.mark.slow
def test_an_onnx_classifier_backbone_trains_labels_serves_and_exports(tmp_path, lite0_classifier):
    import httpx

    from test_serve import Server

    data = make_dataset(tmp_path / "images", per_class=8)
    run = tmp_path / "run"
    p = run_cli("fit", data, "-o", run, "--architecture", lite0_classifier, "--bottleneck-precision", "fp32")
    assert "features '" in p.stderr and "(1280 wide, the input of the final Gemm" in p.stderr
    assert "retrain fit: 24 images, 3 classes" in p.stdout
    held = make_dataset(tmp_path / "held", per_class=2, seed=7)
    lab = json.loads(run_cli("label", run, held, "--json").stdout)
    assert len(lab) == 6 and all(r["predictions"][0]["label"] in ("circle", "stripes", "squares") for r in lab)
    ev = json.loads(run_cli("evaluate", run, data, "--json").stdout)
    assert ev["n"] == 24 and ev["accuracy"] > 0.5
    q = run_cli("export", run, "-f", "onnx-int8", "-o", tmp_path / "int8")
    assert (tmp_path / "int8" / "model.onnx").is_file(), q.stderr
    srv = Server(run)
    try:
        photo = data / "stripes" / "stripes_0.jpg"
        r = httpx.post(f"{srv.url}/v1/classify", content=photo.read_bytes(), headers={"Content-Type": "image/jpeg"})
        assert r.status_code == 200, r.text
        want = json.loads(run_cli("label", run, photo, "--json").stdout)[0]
        assert r.json()["label"] == want["label"]
        assert httpx.get(f"{srv.url}/v1/model").json()["architecture"] == "lite0_classifier.onnx"
    finally:
        out = srv.stop()
    assert "Traceback" not in out
