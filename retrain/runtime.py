"""ONNX Runtime sessions: one place that picks execution providers and threads.

`provider`: auto (best available: TensorRT > CUDA > CPU), cpu, cuda or tensorrt.
- Asking for a GPU provider that this onnxruntime build lacks is one clear error saying what
  to install (MissingDependency, exit 2).
- A GPU provider that is in the build but cannot start (no driver, CUDA/cuDNN/TensorRT
  libraries missing) makes ONNX Runtime quietly fall back to the CPU; here that is an error
  when the provider was asked for by name, and a one-line note under `auto`.
- `auto` falls back to the CPU; it says so (one line on stderr) only where an NVIDIA GPU is
  visible but unused, which is the case a person would want to know about.
TensorRT builds its engine once per model and keeps it in an engine cache folder
($RETRAIN_CACHE/tensorrt).

Bottlenecks in bf16 run on OpenVINO (`openvino_session`), the one CPU runtime here that
uses the bf16 matrix units (AMX, AVX-512 BF16) of recent Intel CPUs: ONNX Runtime's CPU
provider has no bf16 convolutions. Everything else, and every model a user gets, runs on
ONNX Runtime.

`heap_kept()`: glibc's allocator told to keep freed memory while PyTorch trains on a CPU.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections import deque
from pathlib import Path

from retrain.errors import ConfigError, MissingDependency, did_you_mean

PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}
PROVIDER_CHOICES = ("auto", *PROVIDERS)
INSTALL_HINT = {
    "cuda": "pip install onnxruntime-gpu (in place of onnxruntime) on a machine with an NVIDIA GPU "
            "and its CUDA 12 + cuDNN 9 libraries",
    "tensorrt": "pip install onnxruntime-gpu and tensorrt (TensorRT 10) on a machine with an NVIDIA GPU",
}
_NOTED: set = set()  # one fallback note per process, not one per session


def available_providers() -> list[str]:
    import onnxruntime as ort

    return ort.get_available_providers()


def gpu_visible() -> bool:
    """True where an NVIDIA driver exposes a device (no CUDA import, no subprocess)."""
    return os.path.exists("/dev/nvidia0") or os.path.isdir("/proc/driver/nvidia/gpus")


def trt_cache_dir() -> Path:
    from retrain.files import cache_root

    return cache_root() / "tensorrt"


def check_provider_name(provider: str | None) -> str:
    """The provider name, lower case; ConfigError (with a suggestion) if it is not one we know."""
    provider = (provider or "auto").lower()
    if provider not in PROVIDER_CHOICES:
        raise ConfigError(f"unknown provider '{provider}'; choose one of {', '.join(PROVIDER_CHOICES)}."
                          f"{did_you_mean(provider, PROVIDER_CHOICES)}")
    return provider


def _note(msg: str) -> None:
    if msg not in _NOTED:
        _NOTED.add(msg)
        print(f"note: {msg}", file=sys.stderr, flush=True)


def resolve_providers(provider: str = "auto", *, trt_fp16: bool = False) -> list:
    """ONNX Runtime provider list for a name; raises MissingDependency where it can't run.

    trt_fp16 lets TensorRT build fp16 kernels; off by default so that the fp32 and int8 forms
    give the answers `retrain export` verified (an fp16 export turns it on).
    """
    provider = check_provider_name(provider)
    have = available_providers()
    want = {"auto": ["tensorrt", "cuda", "cpu"], "cpu": ["cpu"], "cuda": ["cuda", "cpu"],
            "tensorrt": ["tensorrt", "cuda", "cpu"]}[provider]
    if provider in ("cuda", "tensorrt") and PROVIDERS[provider] not in have:
        raise MissingDependency(
            f"provider '{provider}' is not available in this onnxruntime (it has {', '.join(have)}); "
            f"{INSTALL_HINT[provider]}, or use --provider cpu (or auto)")
    if provider == "auto" and PROVIDERS["cuda"] not in have and gpu_visible():
        _note(f"an NVIDIA GPU is present but this onnxruntime has no CUDA provider, so the CPU is used; "
              f"to use the GPU: {INSTALL_HINT['cuda']}")
    out = []
    for name in want:
        ep = PROVIDERS[name]
        if ep not in have:
            continue
        if name == "tensorrt":
            cache = trt_cache_dir()
            cache.mkdir(parents=True, exist_ok=True)
            out.append((ep, {"trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache),
                             "trt_timing_cache_enable": True, "trt_timing_cache_path": str(cache),
                             "trt_fp16_enable": bool(trt_fp16)}))
        else:
            out.append(ep)
    return out


def provider_names(providers: list) -> list[str]:
    return [p if isinstance(p, str) else p[0] for p in providers]


def _model_format(path) -> str | None:
    """The "format" a retrain model's metadata names (onnx, onnx-int8, onnx-fp16), or None."""
    try:
        import onnx

        m = onnx.load(str(path), load_external_data=False)
        return next((p.value for p in m.metadata_props if p.key == "format"), None)
    except Exception:
        return None


def make_session(path, *, provider: str = "auto", threads: int | None = None, trt_fp16: bool | None = None,
                 cpu_threads: int | None = None):
    """An InferenceSession with full graph optimisation and `threads` intra-op threads.

    trt_fp16: let TensorRT use fp16 kernels; None = only for a model exported as onnx-fp16.
    cpu_threads: intra-op threads in place of `threads` where only the CPU provider is available.
    After creation, checks that the provider asked for is the one actually running: ONNX
    Runtime silently drops a GPU provider whose libraries fail to load.
    """
    import onnxruntime as ort

    from retrain.errors import ModelError

    provider = check_provider_name(provider)
    if trt_fp16 is None:
        trt_fp16 = (provider in ("auto", "tensorrt") and PROVIDERS["tensorrt"] in available_providers()
                    and isinstance(path, (str, os.PathLike)) and _model_format(path) == "onnx-fp16")
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = threads or (os.cpu_count() or 1)
    # No busy-waiting between ops: the image-decoding threads need those cycles (measured +8%
    # bottlenecks/s on 2 cores; see BENCHMARKS.md).
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.log_severity_level = 3
    providers = resolve_providers(provider, trt_fp16=trt_fp16)
    if cpu_threads and provider_names(providers) == [PROVIDERS["cpu"]]:
        so.intra_op_num_threads = cpu_threads
    try:
        sess = ort.InferenceSession(str(path), so, providers=providers)
    except Exception as e:  # onnxruntime raises its own exception types
        msg = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        if provider in ("cuda", "tensorrt") and any(w in msg.lower() for w in ("cuda", "cudnn", "tensorrt", "nvinfer")):
            raise MissingDependency(f"provider '{provider}' failed to start ({msg}); "
                                    f"{INSTALL_HINT[provider]}, or use --provider cpu") from None
        raise ModelError(f"{path}: ONNX Runtime cannot load it ({msg})") from None
    running = sess.get_providers()
    if provider in ("cuda", "tensorrt") and PROVIDERS[provider] not in running:
        raise MissingDependency(
            f"provider '{provider}' is installed but could not start on this machine (ONNX Runtime fell back "
            f"to {', '.join(running)}): check the NVIDIA driver and {INSTALL_HINT[provider]}, "
            "or use --provider cpu")
    if provider == "auto" and running[0] == "CPUExecutionProvider" and len(providers) > 1:
        _note(f"GPU providers ({', '.join(provider_names(providers)[:-1])}) could not start here; "
              "running on the CPU")
    return sess


def session_provider(sess) -> str:
    """The short name of the provider a session runs on first: cpu, cuda or tensorrt."""
    first = sess.get_providers()[0]
    return next((k for k, v in PROVIDERS.items() if v == first), first)


def _cpuinfo_field(name: str) -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith(name)), None)
    except OSError:
        return None


def cpu_name() -> str:
    """The processor's model name (from /proc/cpuinfo where there is one)."""
    import platform

    return _cpuinfo_field("model name") or platform.processor() or platform.machine()


def cpu_flags() -> set[str]:
    """The processor's feature flags (avx512_vnni, amx_bf16, ...); empty where unknown."""
    return set((_cpuinfo_field("flags") or "").split())


def cpu_has_bf16() -> bool:
    """Native bf16 matrix units on this CPU (AMX-BF16 or AVX-512 BF16)."""
    return bool({"amx_bf16", "avx512_bf16"} & cpu_flags())


def cpu_lacks_int8_dot() -> bool:
    """An x86 CPU without int8 dot-product units (VNNI, AMX): there ONNX Runtime's u8 x s8
    kernels add pairs of products in int16, which overflows (EfficientNet-Lite0's int8 features
    had a mean cosine of 0.87 against fp32 on an AVX2-only AMD EPYC; 0.96 with 7-bit weights).
    False where the flags are unknown (not x86: ARM's dot products do not overflow)."""
    flags = cpu_flags()
    return "sse4_2" in flags and not {"avx512_vnni", "avx_vnni", "amx_int8"} & flags


def openvino_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("openvino") is not None


def openvino_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("openvino")
    except PackageNotFoundError:
        return "none"


# glibc mallopt() parameters (malloc.h) and their defaults
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_TRIM_DEFAULT, _MMAP_MAX_DEFAULT = 128 * 1024, 65536


@contextlib.contextmanager
def heap_kept():
    """Within it, glibc malloc serves large blocks from its heap and keeps what is freed. Outside,
    a block above glibc's mapping threshold (128 KB, which glibc raises on its own up to 32 MB
    after frees) is mapped afresh and unmapped when freed. PyTorch has no caching allocator on
    a CPU: every training step allocates and frees its activation maps (24-34 MB each at batch
    64), and each fresh mapping costs a page fault per 4 KB page, millions per epoch (measured
    in a fine-tune: 7.6 million faults and 13.6 s of system time per epoch; kept, 0.1 million
    and 0.2 s; BENCHMARKS.md, issue 15). On leaving, the default values are set again and the
    kept memory is handed back to the system (malloc_trim); glibc's raising of its threshold
    stays off in this process. Not reentrant: one at a time. A no-op elsewhere than glibc
    (macOS, musl)."""
    libc = None
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None)
            if not (hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") and hasattr(libc, "gnu_get_libc_version")):
                libc = None
        except OSError:
            libc = None
    if libc is not None:
        libc.mallopt(_M_MMAP_MAX, 0)
        libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
    try:
        yield
    finally:
        if libc is not None:
            libc.mallopt(_M_MMAP_MAX, _MMAP_MAX_DEFAULT)
            libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_DEFAULT)
            libc.malloc_trim(0)


class OnnxEngine:
    """An ONNX Runtime session as a pipeline engine (retrain.pipeline): run_batch(x) -> outputs of
    its first output for float32 (N, 3, H, W) input."""

    takes_uint8 = False

    def __init__(self, session):
        self.session = session
        self.input_name = session.get_inputs()[0].name

    def __call__(self, x):
        return self.session.run(None, {self.input_name: x})[0]


class OpenVINOSession:
    """A compiled OpenVINO model as a pipeline engine (retrain.pipeline): callable on a batch of
    any size, and asynchronous (submit / finished) to keep several batches in flight.

    It takes the decoded pixels as they are, uint8 (N, H, W, 3): the conversion to float,
    (x - mean) / std and the NHWC -> NCHW transpose are compiled into the model, so the
    decoding threads skip that work.
    """

    takes_uint8 = True

    def __init__(self, path, *, precision: str, size: int, mean, std, batch: int = 8,
                 threads: int | None = None):
        import openvino as ov
        from openvino.preprocess import PrePostProcessor

        from retrain.files import cache_root

        core = ov.Core()
        core.set_property({"CACHE_DIR": str(cache_root() / "openvino")})  # compiled blobs: the second start is quick
        model = core.read_model(str(path))
        # A static batch: OpenVINO's CPU kernels run ~15% faster than with a dynamic one.
        # A short batch is padded to it (see _chunks).
        model.reshape([batch, 3, size, size])
        self.batch = batch
        ppp = PrePostProcessor(model)
        ppp.input().tensor().set_element_type(ov.Type.u8).set_layout(ov.Layout("NHWC"))
        ppp.input().model().set_layout(ov.Layout("NCHW"))
        mean = [float(m) for m in (mean if isinstance(mean, (list, tuple)) else [mean] * 3)]
        std = [float(v) for v in (std if isinstance(std, (list, tuple)) else [std] * 3)]
        ppp.input().preprocess().convert_element_type(ov.Type.f32).mean(mean).scale(std)
        model = ppp.build()
        # Throughput streams (one thread each, not pinned): the decoding threads share the cores,
        # and an independent stream that loses its core for a moment stalls only itself, where
        # the threads of one request wait for each other at every layer (measured: ~5% faster).
        config = {"INFERENCE_PRECISION_HINT": {"bf16": "bf16", "fp32": "f32"}[precision],
                  "PERFORMANCE_HINT": "THROUGHPUT", "ENABLE_CPU_PINNING": False,
                  "INFERENCE_NUM_THREADS": threads or (os.cpu_count() or 1)}
        self.compiled = core.compile_model(model, "CPU", config)
        self.request = self.compiled.create_infer_request()
        self.jobs = max(2, int(self.compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")))
        self.precision = precision
        self._queue = None
        self._finished: deque = deque()

    def _chunks(self, x):
        """x in pieces of exactly `batch` images (the last padded): (piece, real count)."""
        import numpy as np

        for s in range(0, len(x), self.batch):
            piece = x[s:s + self.batch]
            n = len(piece)
            if n < self.batch:
                piece = np.concatenate([piece, np.zeros((self.batch - n, *piece.shape[1:]), piece.dtype)])
            yield piece, n

    def __call__(self, x):
        """Features of any number of images: one request for a batch or less, else all of
        them in flight at once (one request runs on one stream, i.e. a share of the cores)."""
        import numpy as np

        pieces = list(self._chunks(x))
        if not pieces:
            return np.zeros((0, *self.compiled.output(0).shape[1:]), np.float32)
        if len(pieces) == 1:
            piece, n = pieces[0]
            return self.request.infer({0: piece})[0][:n].copy()
        import openvino as ov

        outs: list = [None] * len(pieces)
        queue = ov.AsyncInferQueue(self.compiled, self.jobs)
        queue.set_callback(lambda req, i: outs.__setitem__(i, req.get_output_tensor(0).data[:pieces[i][1]].copy()))
        for i, (piece, _n) in enumerate(pieces):
            queue.start_async({0: piece}, i)
        queue.wait_all()
        return np.concatenate(outs)

    # The asynchronous interface the pipeline prefers: several batches in flight at once.
    def submit(self, x, tag) -> None:
        """Start a batch of at most `batch` images (x is copied); waits only while every request
        is busy. finished() gives back (tag, output)."""
        if self._queue is None:
            import openvino as ov

            self._queue = ov.AsyncInferQueue(self.compiled, self.jobs)
            self._queue.set_callback(self._done)
        if len(x) > self.batch:
            raise ValueError(f"submit takes at most {self.batch} images, got {len(x)}")
        piece, n = next(self._chunks(x))
        self._queue.start_async({0: piece}, (tag, n))

    def _done(self, request, tag_n) -> None:  # on an OpenVINO thread
        tag, n = tag_n
        self._finished.append((tag, request.get_output_tensor(0).data[:n].copy()))

    def finished(self, wait: bool = False) -> list:
        """(tag, output) of the batches done so far; all of them when wait is true."""
        if wait and self._queue is not None:
            self._queue.wait_all()
        out = []
        while self._finished:
            out.append(self._finished.popleft())
        return out


def openvino_session(path, *, precision: str, size: int, mean, std, batch: int = 8, threads: int | None = None):
    """An OpenVINO CPU session of an fp32 ONNX model, run in `precision` (bf16 or fp32), on
    batches of `batch` images."""
    if not openvino_available():
        raise MissingDependency("bf16 bottlenecks run on OpenVINO, which is not installed: "
                                "pip install openvino, or use --bottleneck-precision fp32")
    try:
        return OpenVINOSession(path, precision=precision, size=size, mean=mean, std=std, batch=batch,
                              threads=threads)
    except Exception as e:  # OpenVINO raises its own RuntimeError subclasses
        from retrain.errors import ModelError

        msg = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ModelError(f"OpenVINO could not compile {path} ({msg}); use --bottleneck-precision fp32") from None


def device_description(provider: str = "auto", precision: str = "fp32") -> str:
    """e.g. 'CPU: Intel(R) Xeon(R) ... (2 cores); onnxruntime CPUExecutionProvider'."""
    cpu = cpu_name()
    try:
        eps = [p if isinstance(p, str) else p[0] for p in resolve_providers(provider)]
    except Exception:
        eps = ["?"]
    bottlenecks = f"; bottlenecks in bf16 on OpenVINO {openvino_version()}" if precision == "bf16" else ""
    return f"CPU: {cpu} ({os.cpu_count()} cores); onnxruntime {eps[0]}{bottlenecks}"
