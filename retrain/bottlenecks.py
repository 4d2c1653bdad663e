"""Bottlenecks: every photo's frozen features, computed once by the backbone and cached.

`extract` (one feature vector per photo), `extract_views` (cached distorted views) and the
fine-tuning activations (retrain.finetune) all go through `compute_cached`: look the keys up in
the cache (retrain.cache), run the pipeline (retrain.pipeline) on the missing ones, keep what
was computed whatever stops the run.
"""

from __future__ import annotations

import threading
import time

import numpy as np

from retrain import images
from retrain.architectures import Backbone
from retrain.cache import BottleneckCache, key_of, missing
from retrain.errors import ConfigError, MissingDependency
from retrain.pipeline import run_pipeline
from retrain.progress import Log

_SESSIONS: dict = {}
_SESSIONS_LOCK = threading.Lock()


def choose_precision(asked: str, *, provider: str = "auto") -> str:
    """The bottleneck precision to use: `asked`, or for "auto" the fastest that keeps accuracy.

    auto: bf16 on a CPU with native bf16 units (AMX / AVX-512 BF16) when OpenVINO is installed
    and no GPU provider is in use; fp32 otherwise. --fine-tune too: its bottlenecks give the start
    head and the features of the networks kept frozen, while the part it trains runs on fp32
    activations of its own. int8 is never chosen automatically: its calibration photos are
    flowers, and photos of another kind should not pay for that.
    bf16 or int8 asked for where it cannot run is an error that says why.
    """
    from retrain.runtime import (PROVIDERS, available_providers, cpu_has_bf16, cpu_lacks_int8_dot, gpu_visible,
                                 openvino_available)

    gpu = provider in ("cuda", "tensorrt") or (
        provider == "auto" and gpu_visible() and PROVIDERS["cuda"] in available_providers())
    if asked == "auto":
        if gpu or not cpu_has_bf16() or not openvino_available():
            return "fp32"
        return "bf16"
    if asked == "bf16":
        if provider in ("cuda", "tensorrt"):
            raise ConfigError(f"--bottleneck-precision bf16 runs on the CPU (OpenVINO), not with --provider "
                              f"{provider}; use fp32 there")
        if not cpu_has_bf16():
            raise ConfigError("--bottleneck-precision bf16 needs a CPU with bf16 units (AMX or AVX-512 BF16), "
                              f"which this one lacks; use fp32{'' if cpu_lacks_int8_dot() else ' or int8'}")
        if not openvino_available():
            raise MissingDependency("--bottleneck-precision bf16 runs on OpenVINO, which is not installed: "
                                    "pip install openvino, or use fp32")
    if asked == "int8" and not gpu and cpu_lacks_int8_dot():
        raise ConfigError("--bottleneck-precision int8 needs a CPU with int8 dot-product units (VNNI or AMX), "
                          "which this one lacks: its int8 kernels overflow and the features stray from fp32; "
                          "use fp32 (or auto)")
    return asked


def feature_session(backbone: Backbone, *, provider: str = "auto", precision: str = "fp32", batch: int = 8,
                    log=None):
    """The (process-wide) engine of a backbone's feature extractor, a callable on batches (see
    retrain.pipeline): ONNX Runtime for fp32 and int8, OpenVINO for bf16 (it takes uint8 pixels
    and is compiled for batches of `batch`; see retrain.runtime.OpenVINOSession)."""
    from retrain.features import features_onnx
    from retrain.runtime import OnnxEngine, make_session, openvino_session

    # The whole Backbone (frozen, hashable) is the key: one process may run a network at two
    # sizes (a head-only fit at 288 px, then a fine-tune at 224; the Python API).
    key = (backbone, provider, precision, batch if precision == "bf16" else None)
    with _SESSIONS_LOCK:  # one build per key, also while a background thread is at it (fit.load_data)
        if key not in _SESSIONS:
            path = features_onnx(backbone, precision=precision, log=log)
            if precision == "bf16":
                _SESSIONS[key] = openvino_session(path, precision="bf16", size=backbone.image_size,
                                                  mean=backbone.mean, std=backbone.std, batch=batch)
            else:
                _SESSIONS[key] = OnnxEngine(make_session(path, provider=provider))
        return _SESSIONS[key]


def compute_cached(keys: list[bytes], loader, make_engine, cache: BottleneckCache, *, batch_size: int = 8,
                   workers: int | None = None, mean=127.0, std=128.0, desc: str = "Bottlenecks",
                   quiet: bool = False, out_dtype=np.float32, out: np.ndarray | None = None):
    """Features for every key: from `cache`, or computed now by `make_engine()` on
    `loader(index)` (a photo as uint8 (H, W, 3)) and added to it.

    Returns (features (len(keys), cache.dim) with NaN rows where a photo could not be read,
    {index of a key: reason}, timing). Identical keys are computed once.
    out: the (len(keys), cache.dim) array to fill and return instead of a new one.
    """
    todo = missing(keys, cache)
    timing = {"cached": len(keys) - len(todo), "computed": len(todo)}
    failures: dict[int, str] = {}
    if todo:
        engine = make_engine()

        def on_batch(batch_idx, out):
            cache.add([keys[todo[j]] for j in batch_idx], out.reshape(len(batch_idx), cache.dim))

        t0 = time.perf_counter()
        try:
            fails, t = run_pipeline(todo, loader, engine, batch_size=batch_size, workers=workers, mean=mean,
                                    std=std, on_batch=on_batch, desc=desc, quiet=quiet)
        finally:
            cache.flush()  # what was computed is kept, whatever stopped the run
        timing.update(t, seconds=round(time.perf_counter() - t0, 3))
        bad = {keys[todo[j]]: r for j, r in fails.items()}
        failures = {i: bad[k] for i, k in enumerate(keys) if k in bad}
        cache.compact_if_needed()
    feats = np.empty((len(keys), cache.dim), out_dtype) if out is None else out
    found = np.fromiter((k in cache for k in keys), bool, len(keys))
    feats[~found] = np.nan
    ok = np.nonzero(found)[0]
    if len(ok):
        cache.get([keys[i] for i in ok], out=feats, rows=ok)  # straight into feats, no copy between
    return feats, failures, timing


def extract(items, backbone: Backbone, cache: BottleneckCache, *, provider: str = "auto",
            batch_size: int = 8, workers: int | None = None, quiet: bool = False, log=None):
    """Features for every item (cached or computed now).

    Returns (features (n, C) float32 with NaN rows for failures, {path: reason}, timing dict).
    """
    size, crop = backbone.image_size, backbone.crop_fraction
    feats, fails, timing = compute_cached(
        [key_of(it.digest) for it in items], lambda i: images.load(items[i].path, size, crop),
        lambda: feature_session(backbone, provider=provider, precision=cache.precision, batch=batch_size, log=log),
        cache, batch_size=batch_size, workers=workers, mean=backbone.mean, std=backbone.std, quiet=quiet)
    return feats, {items[i].path: r for i, r in fails.items()}, timing


def extract_views(items, views: int, distortions, backbone: Backbone, cache: BottleneckCache, *,
                  provider: str = "auto", batch_size: int = 32, workers: int | None = None,
                  quiet: bool = False, log=None):
    """Bottlenecks of `views` distorted views of each item (retrain.augment), cached like any other.

    Each view is keyed by key_of(digest, augment.variant(distortions, v)), so a view is computed
    once and reused by every later run with the same settings.
    Returns (features (n, views, C) float32 with NaN rows for failures, timing dict).
    """
    from retrain import augment

    size, crop = backbone.image_size, backbone.crop_fraction
    pairs = [(i, v) for i in range(len(items)) for v in range(views)]

    def loader(j):
        i, v = pairs[j]
        return augment.load_view(items[i].path, items[i].digest, v, distortions, size, crop)

    feats, _fails, timing = compute_cached(
        [key_of(items[i].digest, augment.variant(distortions, v)) for i, v in pairs], loader,
        lambda: feature_session(backbone, provider=provider, precision=cache.precision, batch=batch_size, log=log),
        cache, batch_size=batch_size, workers=workers, mean=backbone.mean, std=backbone.std,
        desc="Distorted views", quiet=quiet)
    return feats.reshape(len(items), views, backbone.feature_dim), timing


def plan_backbone(cfg, precision: str, *, log=None) -> tuple[Backbone, str]:
    """The backbone `retrain fit` uses (cfg.architecture and the --input_* / --bottleneck-tensor
    flags) and the bottleneck precision it can run: bf16 or int8 where the backbone compiles or
    quantizes, else fp32 with one line saying why. --fine-tune on a backbone it cannot split is
    a ConfigError."""
    log = log or Log.silent()
    from retrain.architectures import get_backbone

    bb = get_backbone(cfg.architecture, tensor=getattr(cfg, "bottleneck_tensor", None),
                      mean=getattr(cfg, "input_mean", None), std=getattr(cfg, "input_std", None),
                      height=getattr(cfg, "input_height", None), width=getattr(cfg, "input_width", None),
                      log=log, quiet=cfg.quiet)
    if cfg.fine_tune and bb.kind == "concat":  # fine-tuning trains one network: the first
        log(f"Fine-tuning trains {bb.parts[0]}, the first network of {bb.name}; "
            f"{', '.join(bb.parts[1:])} stay{'s' if len(bb.parts) == 2 else ''} frozen beside it "
            "(--architecture NAME fine-tunes one network alone)")
    if cfg.fine_tune and not bb.can_fine_tune:
        raise bb.fine_tune_error()
    if cfg.fine_tune and bb.train_size and getattr(cfg, "input_height", None) is None \
            and getattr(cfg, "input_width", None) is None:
        bb = bb.at_size(bb.train_size)  # fine-tuning trains the network at the side it was trained at
    if bb.built_in or precision == "fp32":
        return bb, precision
    try:
        feature_session(bb, provider=cfg.provider, precision=precision, batch=cfg.batch_size, log=log)
    except Exception as e:  # noqa: BLE001 - OpenVINO or the quantizer on a graph it cannot handle
        msg = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        log(f"note: {precision} bottlenecks are not available for {bb.name} ({msg}); computing them in fp32")
        return bb, "fp32"
    return bb, precision
