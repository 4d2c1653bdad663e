"""Execution providers: CPU and auto run for real; CUDA/TensorRT run for real where a GPU is lent,
and elsewhere fail with one clear line that says what to install."""

from __future__ import annotations

import json
import sys

import numpy as np
import onnxruntime as ort
import pytest

from conftest import EXAMPLES, make_dataset, make_image, run_cli
from retrain.errors import ConfigError, MissingDependency
from retrain.runtime import make_session, resolve_providers, session_provider, trt_cache_dir

HAVE = ort.get_available_providers()
NO_CUDA = "CUDAExecutionProvider" not in HAVE
NO_TRT = "TensorrtExecutionProvider" not in HAVE


def _one_clear_line(p):
    err = p.stderr.strip().splitlines()
    errors = [line for line in err if line.startswith("error:")]
    assert p.returncode == 2, p.stderr
    assert len(errors) == 1 and "Traceback" not in p.stderr, p.stderr
    return errors[0]


def test_cpu_and_auto_resolve_to_a_working_session(tiny_run):
    assert resolve_providers("cpu") == ["CPUExecutionProvider"]
    auto = resolve_providers("AUTO")
    assert (auto[-1] if isinstance(auto[-1], str) else auto[-1][0]) == "CPUExecutionProvider"
    s = make_session(tiny_run / "model.onnx", provider="auto", threads=1)
    x = np.zeros((1, 3, 224, 224), np.float32)  # the default model's side
    p = s.run(None, {"input": x})[0]
    assert p.shape == (1, 3) and abs(float(p.sum()) - 1) < 1e-4
    if NO_CUDA and NO_TRT:
        assert session_provider(s) == "cpu"


def test_unknown_provider_suggests_the_closest():
    with pytest.raises(ConfigError, match="Did you mean 'cuda'"):
        resolve_providers("cdua")


@pytest.mark.parametrize("provider", ["cuda", "tensorrt"])
def test_missing_gpu_provider_is_one_line_naming_the_package(provider, tiny_run):
    if ("CUDAExecutionProvider" if provider == "cuda" else "TensorrtExecutionProvider") in HAVE:
        pytest.skip(f"{provider} is available here: the real path is tested in test_gpu_providers_agree_with_cpu")
    with pytest.raises(MissingDependency, match="onnxruntime-gpu"):
        resolve_providers(provider)
    img = next(EXAMPLES.rglob("*.jpg"))
    for cmd in (["label", tiny_run, img], ["evaluate", tiny_run, EXAMPLES], ["bench", tiny_run, "--runs", "1"]):
        line = _one_clear_line(run_cli(*cmd, "--provider", provider, check=False))
        assert f"provider '{provider}' is not available" in line and "onnxruntime-gpu" in line
        assert "--provider cpu" in line


def test_auto_labels_on_this_machine(tiny_run, tmp_path):
    """--provider auto (whatever it picks here) names each new photo's class, with the scores
    of a plain CPU session of the same model."""
    from retrain.classifier import Classifier

    photos = [make_image(tmp_path / f"{k}.png", k, 9000 + k) for k in range(3)]
    p = run_cli("label", tiny_run, *photos, "--provider", "auto", "--top-k", "1", "--json")
    assert "error" not in p.stderr
    got = [r["predictions"][0] for r in json.loads(p.stdout)]
    assert [g["label"] for g in got] == ["circle", "stripes", "squares"]  # make_image's kinds 0, 1, 2
    cpu = Classifier(tiny_run, provider="cpu").classify([str(x) for x in photos], top_k=1)
    for g, ref in zip(got, cpu):
        assert abs(g["score"] - ref["predictions"][0]["score"]) < 2e-3


@pytest.mark.skipif(not NO_CUDA, reason="CUDA is available here")
def test_bottleneck_extraction_with_missing_cuda_fails_cleanly(tmp_path):
    data = make_dataset(tmp_path / "imgs", per_class=3, seed=7)
    p = run_cli("fit", data, "-o", tmp_path / "run", "--provider", "cuda", "--cache-dir", tmp_path / "cache",
                "-q", check=False)
    line = _one_clear_line(p)
    assert "cuda" in line and "onnxruntime-gpu" in line
    assert not (tmp_path / "run").exists()


def test_tensorrt_engine_cache_lives_in_the_retrain_cache(retrain_cache, tmp_path):
    assert trt_cache_dir() == retrain_cache / "tensorrt"


@pytest.mark.gpu
@pytest.mark.skipif(NO_CUDA, reason="no CUDA provider in this onnxruntime (no GPU lent)")
@pytest.mark.parametrize("provider", ["cuda", "tensorrt"])
def test_gpu_providers_agree_with_cpu(provider, tiny_run, tmp_path):
    if provider == "tensorrt" and NO_TRT:
        pytest.skip("no TensorRT provider")
    from retrain.classifier import Classifier

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (4, 224, 224, 3), dtype=np.uint8)
    cpu = Classifier(tiny_run, provider="cpu").predict(x)
    gpu_clf = Classifier(tiny_run, provider=provider)
    assert session_provider(gpu_clf.session) == provider
    assert np.abs(gpu_clf.predict(x) - cpu).max() < 2e-3
    if provider == "tensorrt":
        assert any(trt_cache_dir().iterdir()), "TensorRT engine was not cached"



FAULTS_OF_STEPS = """
import contextlib, resource, sys, torch
from retrain.architectures import get_backbone
from retrain.backbone_split import make_tail
from retrain.features import build_torch
from retrain.runtime import heap_kept
tail = make_tail(build_torch(get_backbone("efficientnet_lite0")), 8).train().to(memory_format=torch.channels_last)
x = torch.randn(64, 80, 14, 14).to(memory_format=torch.channels_last)
def step():
    tail.zero_grad(set_to_none=True)
    tail(x).square().mean().backward()
with (heap_kept() if sys.argv[1] == "kept" else contextlib.nullcontext()):
    step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(3):
        step()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator: Linux only")
def test_heap_kept_makes_training_steps_reuse_memory_instead_of_fresh_pages():
    """Three training steps of the fine-tuned tail at batch 64 (each in a fresh process): without
    heap_kept, glibc maps the large activation maps afresh at every step, a page fault per page
    (here about 850,000); within it, the freed memory is reused (here about 44,000)."""
    pytest.importorskip("torch")
    import subprocess

    def faults(mode):
        p = subprocess.run([sys.executable, "-c", FAULTS_OF_STEPS, mode], capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stderr[-2000:]
        return int(p.stdout.split()[-1])

    plain, kept = faults("plain"), faults("kept")
    assert plain > 5 * kept, (plain, kept)
