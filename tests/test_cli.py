"""The real CLI, end to end, in a subprocess: fit -> label -> evaluate, and every user error."""

import json
import subprocess
import sys

import pytest

from conftest import make_dataset, make_image, run_cli
from retrain.runtime import cpu_has_bf16, cpu_lacks_int8_dot, openvino_available


@pytest.fixture(scope="module")
def e2e(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    data = make_dataset(root / "train", per_class=6)
    held = make_dataset(root / "held", per_class=3, seed=7)
    run = root / "run"
    r = run_cli("fit", data, "--output", run, "--cache-dir", root / "cache")
    return root, data, held, run, r


def test_fit_writes_a_complete_run_and_a_summary_line(e2e):
    root, data, held, run, r = e2e
    for f in ("model.onnx", "labels.txt", "report.json", "split.json"):
        assert (run / f).is_file(), f
    # 6 photos per class: the small-data regime (k-fold cross-validation, issue 15)
    assert "retrain fit: 18 images, 3 classes, 0 skipped, cross-validated accuracy" in r.stdout
    assert "Traceback" not in r.stderr


def test_label_prints_top_labels(e2e):
    root, data, held, run, _ = e2e
    r = run_cli("label", run, held / "circle" / "circle_0.jpg")
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 3 and lines[0].startswith("circle (score=")
    r = run_cli("label", run, held, "--json", "--top-k", "2")
    out = json.loads(r.stdout)
    assert len(out) == 9 and all(len(o["predictions"]) == 2 for o in out)
    right = sum(o["label"] == o["path"].split("/")[-2] for o in out)
    assert right >= 7


def test_evaluate_json_is_one_object_with_the_promised_fields(e2e):
    root, data, held, run, _ = e2e
    r = run_cli("evaluate", run, held, "--json")
    m = json.loads(r.stdout)
    assert {"accuracy", "n", "per_class", "confusion", "misclassified"} <= set(m)
    assert m["n"] == 9 and 0 <= m["accuracy"] <= 1 and m["accuracy"] >= 0.7
    assert sum(map(sum, m["confusion"])) == 9
    assert set(m["per_class"]) == {"circle", "squares", "stripes"}
    assert all({"path", "true", "predicted", "confidence"} <= set(x) for x in m["misclassified"])
    human = run_cli("evaluate", run, held)
    assert "accuracy" in human.stdout and "confusion" in human.stdout


def test_codelab_flags(e2e, tmp_path):
    root, data, held, run, _ = e2e
    r = run_cli("fit", "--image_dir", data, "--output_graph", tmp_path / "g.onnx",
                "--output_labels", tmp_path / "l.txt", "--how_many_training_steps", "50",
                "--learning_rate", "0.05", "--train_batch_size", "10", "--eval_step_interval", "5",
                "--testing_percentage", "20", "--validation_percentage", "20",
                "--bottleneck_dir", root / "cache", "--final_tensor_name", "probs",
                "--print_misclassified_test_images", "-o", tmp_path / "run")
    assert (tmp_path / "g.onnx").is_file() and (tmp_path / "l.txt").read_text().split() == ["circle", "squares", "stripes"]
    rep = json.loads((tmp_path / "run" / "report.json").read_text())
    assert rep["train"]["optimizer"] == "sgd" and rep["train"]["steps"] == 50
    assert [h["step"] for h in rep["history"]][:3] == [5, 10, 15]
    # label_image.py's flags, with the renamed output.
    img = held / "stripes" / "stripes_1.jpg"
    codelab = ("--graph", tmp_path / "g.onnx", "--labels", tmp_path / "l.txt",
               "--output_layer", "probs", "--input_height", "224", "--input_width", "224")
    r = run_cli("label", *codelab, "--image", img, "--input_mean", "127", "--input_std", "128")
    # The same answer, to the printed digit, as the run folder's model with its own metadata
    # (mean 127, std 128, 224 px): the flags reached the preprocessing ...
    assert r.stdout == run_cli("label", tmp_path / "run", img).stdout
    assert sorted(line.split(" (score=")[0] for line in r.stdout.splitlines()) == ["circle", "squares", "stripes"]
    # ... and they are used: another mean and std give other answers (the novelty score: the
    # class scores of these synthetic photos are 1 and 0 to the printed digit either way).
    def answer(mean, std):
        return json.loads(run_cli("label", *codelab, "--image", img, "--input_mean", mean, "--input_std", std,
                                  "--json").stdout)[0]

    mine, other = answer("127", "128"), answer("0", "255")
    assert mine["novelty"] is not None and other["novelty"] != mine["novelty"] and len(other["predictions"]) == 3


def test_label_does_not_import_torch(e2e):
    root, data, held, run, _ = e2e
    code = ("import sys; from retrain.cli import main; "
            f"rc = main(['label', {str(run)!r}, {str(held / 'circle' / 'circle_1.jpg')!r}]); "
            "assert 'torch' not in sys.modules and 'scipy' not in sys.modules, 'heavy import'; sys.exit(rc)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def _fails(*args, match):
    r = run_cli(*args, check=False)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert "Traceback" not in r.stderr, r.stderr
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], r.stderr  # one error line, last
    assert match in errors[0], errors[0]
    return errors[0]


def test_user_errors_are_one_clear_line(e2e, tmp_path):
    root, data, held, run, _ = e2e
    _fails("fit", tmp_path / "nope", match="image folder not found")
    _fails("fit", data, "--architecture", "efficientnet_lite7", match="known: efficientnet_lite0")
    _fails("fit", data, "--learnin_rate", "0.1", match="Did you mean '--learning_rate'")
    _fails("fit", data, "--learning_rate", "fast", match="expects a float")
    _fails("fit", data, "--testing_percentage", "100", match="between 0 and 100")
    _fails("fitt", data, match="Did you mean 'fit'")
    _fails("label", run, tmp_path / "missing.jpg", match="image not found")
    notmodel = tmp_path / "notes.onnx"
    notmodel.write_text("just text")
    _fails("label", notmodel, held / "circle" / "circle_0.jpg", match="not an ONNX model")
    _fails("label", tmp_path, held / "circle" / "circle_0.jpg", match="not a retrain run folder")
    (tmp_path / "two.txt").write_text("a\nb\n")
    _fails("label", run, held / "circle" / "circle_0.jpg", "--labels", tmp_path / "two.txt",
           match="labels do not match the model: 2 labels")
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 nope")
    _fails("label", run, bad, match="bad.jpg")


def test_small_and_empty_classes(tmp_path):
    data = make_dataset(tmp_path / "d", per_class=5)
    (tmp_path / "d" / "empty").mkdir()
    _fails("fit", data, "-o", tmp_path / "r", match="class 'empty' has 0 usable images")
    (tmp_path / "d" / "empty").rmdir()
    make_image(tmp_path / "d" / "lonely" / "one.jpg", 0, 1)
    err = run_cli("fit", data, "-o", tmp_path / "r", "--cache-dir", tmp_path / "c", check=False).stderr
    _fails("fit", data, "-o", tmp_path / "r", match="class 'lonely' has 1 usable image;")
    assert "Bottlenecks:" not in err and not list((tmp_path / "c").glob("*/shard-*"))  # failed fast


def test_bad_files_in_the_data_are_listed_not_fatal(tmp_path):
    data = make_dataset(tmp_path / "d", per_class=5)
    (data / "circle" / "zero.jpg").write_bytes(b"")
    (data / "circle" / "text.jpg").write_text("hello")
    make_image(data / "stripes" / "cmyk.jpg", 1, 50, mode="CMYK")
    from PIL import Image
    Image.new("L", (9000, 8000)).save(data / "squares" / "bomb.png")
    r = run_cli("fit", data, "-o", tmp_path / "r")
    rep = json.loads((tmp_path / "r" / "report.json").read_text())
    reasons = {s["path"].split("/")[-1]: s["reason"] for s in rep["skipped"]}
    assert set(reasons) == {"zero.jpg", "text.jpg", "bomb.png"}
    assert "decompression bomb" in reasons["bomb.png"]
    assert "3 skipped" in r.stdout
    assert rep["class_counts"]["stripes"] == 6  # the CMYK photo was used


def test_evaluate_unknown_class_folder(e2e, tmp_path):
    root, data, held, run, _ = e2e
    make_dataset(tmp_path / "e", classes=("circle", "triangles"), per_class=2)
    _fails("evaluate", run, tmp_path / "e", match="'triangles'")


def test_help_lists_commands():
    r = run_cli("--help")
    assert "fit" in r.stdout and "label" in r.stdout and "evaluate" in r.stdout


def _fit_with_precision(e2e, out, precision):
    """Fit with --bottleneck-precision, check the report names it and the model labels held-out
    photos; returns the model's metadata."""
    import onnxruntime as ort

    root, data, held, _, _ = e2e
    run_cli("fit", data, "-o", out, "--cache-dir", root / "cache", "--bottleneck-precision", precision)
    assert json.loads((out / "report.json").read_text())["bottleneck_precision"] == precision
    out_labels = json.loads(run_cli("label", out, held / "stripes", "--json").stdout)
    assert sum(o["label"] == "stripes" for o in out_labels) >= 2
    return ort.InferenceSession(str(out / "model.onnx")).get_modelmeta().custom_metadata_map


@pytest.mark.slow
def test_int8_bottlenecks_from_the_cli(e2e, tmp_path):
    _, data, _, run, _ = e2e
    if cpu_lacks_int8_dot():  # the one-line refusal instead
        _fails("fit", data, "-o", tmp_path / "refused", "--bottleneck-precision", "int8",
               match="needs a CPU with int8 dot-product units")
        assert not (tmp_path / "refused").exists()
        pytest.skip("int8 bottlenecks need a CPU with VNNI or AMX")
    meta = _fit_with_precision(e2e, tmp_path / "r8", "int8")
    assert meta["backbone_precision"] == "int8"
    assert (tmp_path / "r8" / "model.onnx").stat().st_size < (run / "model.onnx").stat().st_size / 2
    assert oct((run / "model.onnx").stat().st_mode & 0o777) == "0o644"
    _fails("fit", data, "--bottleneck-precision", "int4", match="Did you mean 'int8'")
    _fails("export", tmp_path / "r8", "--format", "onnx-int8", "--output", tmp_path / "x",
           match="already quantized")


@pytest.mark.skipif(not (cpu_has_bf16() and openvino_available()),
                    reason="needs a CPU with AMX / AVX-512 BF16 and OpenVINO installed")
def test_bf16_bottlenecks_from_the_cli_give_an_fp32_model(e2e, tmp_path):
    meta = _fit_with_precision(e2e, tmp_path / "r16", "bf16")
    assert meta["backbone_precision"] == "fp32" and meta["bottleneck_precision"] == "bf16"
    assert "bf16" in (tmp_path / "r16" / "report.html").read_text()


@pytest.mark.slow
def test_ctrl_c_at_any_moment_ends_cleanly(tmp_path):
    """Ctrl-C while the photos are hashed, the backbone compiles in the background, bottlenecks
    run, or the head trains: exit code 130 and one message, never a traceback or a hang."""
    import signal
    import time

    data = make_dataset(tmp_path / "data", per_class=40)
    for k, delay in enumerate((0.05, 0.15, 0.3, 0.6, 1.0)):
        cache = tmp_path / f"cache{k}"
        p = subprocess.Popen([sys.executable, "-m", "retrain", "fit", str(data), "-o", str(tmp_path / f"run{k}"),
                              "--cache-dir", str(cache)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True)
        deadline = time.time() + 60
        while not list(cache.glob("*/meta.json")) and time.time() < deadline:  # the command has started
            time.sleep(0.002)
        time.sleep(delay)
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=60)  # a hang fails here
        assert "Traceback" not in err and "Fatal" not in err, err
        # 130 and the message; or, when the press came as the command ended, a finished run
        # (exit 0, or killed by SIGINT while Python shut down: what a shell also shows as 130).
        assert p.returncode == 130 and "interrupted: finished work is kept" in err \
            or p.returncode in (0, -signal.SIGINT) and (tmp_path / f"run{k}" / "model.onnx").is_file(), \
            (delay, p.returncode, err)
