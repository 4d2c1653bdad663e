"""ONNX Runtime sessions: one place that picks execution providers and threads.

`provider`: auto (best available: TensorRT > CUDA > CPU), cpu, cuda or tensorrt. Asking for
a GPU provider that this onnxruntime build lacks is a clear error saying what to install;
`auto` falls back to the CPU silently.
"""

from __future__ import annotations

import os
from pathlib import Path

from retrain.errors import MissingDependency, ConfigError, did_you_mean

PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}
PROVIDER_CHOICES = ("auto", *PROVIDERS)


def available_providers() -> list[str]:
    import onnxruntime as ort

    return ort.get_available_providers()


def resolve_providers(provider: str = "auto", *, trt_cache: str | os.PathLike | None = None) -> list:
    """ONNX Runtime provider list for a name; raises MissingDependency where it can't run."""
    provider = (provider or "auto").lower()
    if provider not in PROVIDER_CHOICES:
        raise ConfigError(f"unknown provider '{provider}'; choose one of {', '.join(PROVIDER_CHOICES)}."
                          f"{did_you_mean(provider, PROVIDER_CHOICES)}")
    have = available_providers()
    want = {"auto": ["tensorrt", "cuda", "cpu"], "cpu": ["cpu"], "cuda": ["cuda", "cpu"],
            "tensorrt": ["tensorrt", "cuda", "cpu"]}[provider]
    if provider in ("cuda", "tensorrt") and PROVIDERS[provider] not in have:
        raise MissingDependency(
            f"provider '{provider}' is not available in this onnxruntime (it has {', '.join(have)}); "
            "install onnxruntime-gpu (and TensorRT for 'tensorrt') on a machine with an NVIDIA GPU, "
            "or use --provider cpu")
    out = []
    for name in want:
        ep = PROVIDERS[name]
        if ep not in have:
            continue
        if name == "tensorrt":
            cache = Path(trt_cache or Path.home() / ".cache" / "retrain" / "tensorrt")
            cache.mkdir(parents=True, exist_ok=True)
            out.append((ep, {"trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache),
                             "trt_fp16_enable": True}))
        else:
            out.append(ep)
    return out


def make_session(path, *, provider: str = "auto", threads: int | None = None, trt_cache=None):
    """An InferenceSession with full graph optimisation and `threads` intra-op threads."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = threads or (os.cpu_count() or 1)
    so.log_severity_level = 3
    providers = resolve_providers(provider, trt_cache=trt_cache)
    try:
        return ort.InferenceSession(str(path), so, providers=providers)
    except Exception as e:  # onnxruntime raises its own exception types
        from retrain.errors import ModelError

        raise ModelError(f"{path}: ONNX Runtime cannot load it ({str(e).splitlines()[0][:200]})") from None
