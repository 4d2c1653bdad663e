"""`retrain fit`'s inputs: the Plan (the flags, settled and checked before any work) and the
Data (the photos that could be read, their bottlenecks and their split), with the stages that
make them (plan_fit, load_data) and their checks. retrain.fit runs the stages in order.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from retrain.config import FitConfig, check_ranges
from retrain.errors import ConfigError
from retrain.progress import Log, in_background


@dataclass
class Plan:
    """What the flags resolve to, settled (and checked) before any work."""

    cfg: FitConfig
    out: Path  # the run folder to write (absolute)
    backbone: object  # retrain.architectures.Backbone
    precision: str  # bottleneck precision: fp32, bf16 or int8
    optimizer: str  # lbfgs or sgd
    distortions: object  # retrain.augment.Distortions
    views: int  # distorted views per training photo (0: none)


@dataclass
class Data:
    """The photos that could be read, their features and their split."""

    scan: object  # retrain.scan.ScanResult
    cache: object  # retrain.bottlenecks.BottleneckCache
    items: list  # ImageItem of every readable photo
    X: np.ndarray  # (n, C) float32 bottlenecks
    y: np.ndarray  # (n,) class indices
    labels: list[str]
    parts: dict[str, np.ndarray]  # "train" / "validation" / "test" -> indices into items
    skipped: list[dict]  # {"path", "reason"}: unreadable files, loops, ...
    warnings: list[str]
    bottleneck_timing: dict
    timings: dict = field(default_factory=dict)
    stream: dict | None = None  # fit --features of a large store: retrain.streamfit's streamed optimiser

    @property
    def split(self):
        return self.parts["train"], self.parts["validation"], self.parts["test"]


# ------------------------------------------------------------------------------ the stages

def plan_fit(cfg: FitConfig, log=None) -> Plan:
    """Check the flags and where the run goes; settle precision, backbone and optimizer."""
    from retrain import augment
    from retrain.bottlenecks import plan_backbone
    from retrain.bottlenecks import choose_precision

    validate_config(cfg)
    out = check_outputs(cfg)  # refused before any work: a user's folder is never replaced
    if cfg.ray:  # Ray installed and something answering at the address, before any work
        from retrain.distributed import check_address

        check_address(cfg.ray)
    precision = choose_precision(cfg.bottleneck_precision, provider=cfg.provider)
    # A name, a zoo download or an ONNX file (cut at its features); bf16/int8 where it compiles, else fp32.
    backbone, precision = plan_backbone(cfg, precision, log=log or Log(cfg.quiet))
    distortions, views = augment.resolve(cfg)
    optimizer = cfg.optimizer
    if optimizer == "auto":
        # --learning_rate means the codelab's SGD, except with --fine-tune, where it is the fine-tuning rate.
        optimizer = "sgd" if ((cfg.learning_rate is not None and not cfg.fine_tune)
                              or cfg.how_many_training_steps is not None) else "lbfgs"
    return Plan(cfg, out, backbone, precision, optimizer, distortions, views)


def load_data(plan: Plan, log) -> Data:
    """Scan the folder, compute (or read) every photo's bottleneck, split into train/val/test."""
    from retrain.bottlenecks import extract, feature_session
    from retrain.cache import BottleneckCache, default_cache_dir
    from retrain.check import quick_check
    from retrain.scan import scan
    from retrain.split import check_class_sizes, split_parts

    cfg, bb = plan.cfg, plan.backbone
    if cfg.features:  # a feature store (retrain embed): no photos, no bottleneck cache
        from retrain.streamfit import load_store

        return Data(**load_store(plan, log))
    timings = {}
    cache = BottleneckCache(cfg.cache_dir or default_cache_dir(), bb, precision=plan.precision, log=log)
    if not len(cache) and not cfg.ray:  # an empty cache: every photo will need the backbone, so build it while scanning
        # (OpenVINO compiles for ~0.4 s). An error is raised again when extract() asks for it.
        in_background(feature_session, bb, provider=cfg.provider, precision=plan.precision,
                      batch=cfg.batch_size, log=log)
    t0 = time.perf_counter()
    s = scan(cfg.image_dir, quiet=cfg.quiet)
    timings["scan_s"] = round(time.perf_counter() - t0, 3)
    log(f"Found {len(s.items)} images in {len(s.classes)} classes in {s.root}"
        + (f" ({len(s.skipped)} skipped, {len(s.ignored)} non-image files ignored)" if s.skipped or s.ignored else ""))
    check_class_sizes(s.items, s.classes)  # fail before computing any bottleneck
    warnings_ = quick_check(s)  # the cheap part of `retrain check`
    for w in warnings_:
        log.warn(w)

    t0 = time.perf_counter()
    in_background(_import, "scipy.optimize", "onnx")  # needed after the bottlenecks: imported while they run
    given, ray_failed, ray_timing = s.items, {}, None
    if cfg.ray:  # the photos missing from the cache computed on the cluster, into the cache
        from retrain.distributed import bottlenecks_ray

        ray_failed, ray_timing = bottlenecks_ray(s.items, bb, cache, address=cfg.ray, precision=plan.precision,
                                                 batch_size=cfg.batch_size, quiet=cfg.quiet, log=log)
        given = [it for it in s.items if it.path not in ray_failed]  # the rest: all in the cache now
    feats, failures, btiming = extract(given, bb, cache, provider=cfg.provider, batch_size=cfg.batch_size,
                                       workers=cfg.workers or None, quiet=cfg.quiet, log=log)
    if cfg.ray:
        btiming["ray"] = ray_timing
        failures = {it.path: ray_failed.get(it.path) or failures[it.path] for it in s.items
                    if it.path in ray_failed or it.path in failures}  # in scan order, as without --ray
    timings["bottlenecks_s"] = round(time.perf_counter() - t0, 3)
    if btiming.get("computed"):
        log(f"Bottlenecks: {btiming['computed']} computed in {btiming.get('seconds', 0):.1f} s "
            f"({btiming['computed'] / max(btiming.get('seconds', 1e-9), 1e-9):.0f} images/s), "
            f"{btiming['cached']} from cache")
    skipped = s.skipped + [{"path": p, "reason": r} for p, r in failures.items()]
    ok = [i for i, it in enumerate(given) if it.path not in failures]
    items = [given[i] for i in ok]

    y, parts = split_parts(items, s.classes, cfg, log)
    return Data(s, cache, items, feats[ok], y, s.classes, parts, skipped, warnings_, btiming, timings)


# ------------------------------------------------------------------------------ helpers of the stages

def validate_config(cfg: FitConfig) -> None:
    """Bad flag values -> one ConfigError naming the value and what is allowed."""
    def need(cond, msg):
        if not cond:
            raise ConfigError(msg)

    need(cfg.image_dir or cfg.features,
         "no image folder given: retrain fit IMAGE_DIR (one subfolder of photos per class), or --features STORE")
    need(not (cfg.image_dir and cfg.features), "give an image folder or --features STORE, not both (the store "
         "already holds the photos' features: retrain embed DIR --out STORE adds new photos to it)")
    need(not (cfg.features and (cfg.fine_tune or cfg.distortions_requested())),
         "--features trains the final layer from stored features: --fine-tune and distortions need the photos")
    need(cfg.optimizer != "stream" or cfg.features, "--optimizer stream trains from a feature store: add "
         "--features STORE (retrain embed DIR --out STORE makes one)")
    need(not (cfg.ray and cfg.features), "--ray computes the photos' bottlenecks on a Ray cluster, and --features "
         "STORE already holds them: drop --ray (retrain embed DIR --out STORE --ray ADDRESS fills a store there)")
    need(not (cfg.ray and (cfg.fine_tune or cfg.distortions_requested())), "--ray computes the frozen bottlenecks "
         "on a Ray cluster; --fine-tune and distortions (--flip_left_right, --random_*, --augment) compute theirs on "
         "this machine, not there: drop --ray, or them")
    for name in ("testing_percentage", "validation_percentage"):
        v = getattr(cfg, name)
        need(0 < v < 100, f"--{name} must be between 0 and 100 (exclusive), got {v}")
    need(cfg.testing_percentage + cfg.validation_percentage < 90,
         f"--testing_percentage + --validation_percentage must leave at least 10% for training, got "
         f"{cfg.testing_percentage + cfg.validation_percentage}")
    need(cfg.learning_rate is None or cfg.learning_rate > 0,
         f"--learning_rate must be positive, got {cfg.learning_rate}")
    for name in ("train_batch_size", "eval_step_interval", "batch_size"):
        need(getattr(cfg, name) >= 1, f"--{name} must be at least 1, got {getattr(cfg, name)}")
    need(cfg.unknown_precision is None or 0 < cfg.unknown_precision < 1,
         f"--unknown-precision is a precision between 0 and 1 (e.g. 0.95), got {cfg.unknown_precision}")
    need(1 <= cfg.unfreeze <= 16, f"--unfreeze is a number of backbone blocks from the end, 1 to 16, "
         f"got {cfg.unfreeze}")
    need(not (cfg.fine_tune and cfg.bottleneck_precision == "int8"),
         "--fine-tune trains the backbone in floating point: use it with --bottleneck-precision fp32 or bf16")
    need(not cfg.resume or cfg.fine_tune, "--resume continues an interrupted --fine-tune; add --fine-tune")
    need(cfg.nproc <= 1 or cfg.fine_tune, f"--nproc {cfg.nproc} runs the epochs of --fine-tune in {cfg.nproc} "
         "processes; add --fine-tune (the head-only fit runs in one)")
    need(cfg.final_tensor_name.replace("_", "").replace("/", "").isalnum(),
         f"--final_tensor_name must be letters, digits and _ , got '{cfg.final_tensor_name}'")
    need(not (cfg.no_unknown and cfg.unknown_examples), "--unknown-examples tightens the novelty threshold, "
         "which --no-unknown turns off; drop one of them")
    if cfg.unknown_examples and cfg.image_dir:
        from retrain.novelty import check_examples_folder, list_photos

        check_examples_folder(cfg.unknown_examples, cfg.image_dir)
        list_photos(cfg.unknown_examples)  # a folder with images, before any work
    check_ranges(cfg)  # every other number: finite and within its table range (--l2 inf, --seed -1, ...)


def check_outputs(cfg: FitConfig) -> Path:
    """The run folder to write (absolute), after checking that it and --output_graph /
    --output_labels may be written (retrain.run's rules). Raises ConfigError."""
    from retrain.run import check_destination, is_labels_file, is_retrain_model

    image_dir = Path(cfg.image_dir or cfg.features).expanduser()
    out = check_destination(cfg.output or Path("runs") / image_dir.resolve().name, image_dir=image_dir)
    for flag, path, ours in (("--output_graph", cfg.output_graph, is_retrain_model),
                             ("--output_labels", cfg.output_labels, is_labels_file)):
        p = Path(path).expanduser() if path else None
        if p is not None and (p.is_dir() or (p.exists() and not ours(p))):
            raise ConfigError(f"{flag} {p} is {'a folder' if p.is_dir() else 'a file retrain did not write'}; "
                              "give a new file name (retrain never overwrites a file it did not write)")
    return out


def checkpoint_path(out: Path) -> Path:
    """Where an interrupted --fine-tune of run folder `out` keeps its checkpoint."""
    return Path(out).parent / f".{Path(out).name}.fine-tune-checkpoint.pt"


def _import(*modules: str) -> None:
    import importlib

    for m in modules:
        try:
            importlib.import_module(m)
        except ImportError:
            pass
