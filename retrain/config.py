"""One place for `retrain fit` defaults: each setting with its type and a one-line description.

The CLI builds its flags from this table (codelab spellings are aliases); the final config
is saved into every run folder (report.json) so a run can be repeated.
"""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, field, fields

from retrain.errors import ConfigError, did_you_mean

MEAN_RANGE = (-1e4, 1e4)  # as for --input_mean
STD_RANGE = (1e-6, 1e4)  # as for --input_std
# The default backbone: EfficientNet-Lite0 and -Lite1 side by side at 224 px, their pooled
# features concatenated (2,560 wide): +0.7 to +1.3 points of 5-fold cross-validated accuracy on
# the flowers over Lite0 alone at 288 px, for 1.3x its bottleneck time (BENCHMARKS.md, issue 15,
# third pass).
# --fine-tune trains the first of them (retrain.bottlenecks.plan_backbone).
DEFAULT_ARCHITECTURE = "efficientnet_lite0+efficientnet_lite1"


def opt(default, help: str, *aliases: str, choices=None, metavar=None, range=None):
    """A setting: default, one-line help, codelab aliases, allowed `choices` or numeric `range`
    (lo, hi), both inclusive; a number outside it, NaN or infinity is refused)."""
    return field(default=default, metadata={"help": help, "aliases": aliases, "choices": choices,
                                            "metavar": metavar, "range": range})


def check_number(flag: str, value, lo, hi, *, allow=(), above: bool = False):
    """`value` if it is a finite number in [lo, hi] ((lo, hi] with `above`), or one of `allow`;
    else a ConfigError that names the flag, the value and the range."""
    import math

    if value in allow and not isinstance(value, bool):
        return value
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
        and (lo < value if above else lo <= value) and value <= hi
    if not ok:
        also = f" (or {', '.join(map(str, allow))})" if allow else ""
        low = f"above {_num(lo)}" if above else f"from {_num(lo)}"
        raise ConfigError(f"{flag} must be a number {low} to {_num(hi)}{also}, got {value}")
    return value


def _num(x) -> str:
    return f"{x:,}" if isinstance(x, int) else f"{x:g}"


def bounded(t, lo, hi, flag: str, *, allow=()):
    """An argparse `type=` that reads a `t` (int or float) and checks it with check_number."""
    def convert(text):
        try:
            v = t(text)
        except ValueError:
            raise ConfigError(f"{flag} expects a{'n' if t is int else ''} {t.__name__}, got '{text}'") from None
        return check_number(flag, v, lo, hi, allow=allow)
    return convert


def check_ranges(cfg) -> None:
    """Every numeric setting of `cfg` within the range its table entry states."""
    for f in fields(cfg):
        r = f.metadata.get("range")
        v = getattr(cfg, f.name)
        if r is not None and v is not None and not isinstance(v, str):
            lo, hi, *allow = r
            check_number(f"--{f.name}", v, lo, hi, allow=tuple(allow))


@dataclass
class FitConfig:
    # --- data
    image_dir: str | None = opt(None, "folder with one subfolder of photos per class", "--image_dir")
    output: str | None = opt(None, "run folder to write (default runs/<image folder name>)",
                             "--output_dir", "-o")
    testing_percentage: float = opt(10.0, "percent of images for the test split", "--testing_percentage",
                                    range=(0.01, 89.99))
    validation_percentage: float = opt(10.0, "percent of images for the validation split",
                                       "--validation_percentage", range=(0.01, 89.99))
    # --- backbone and bottlenecks
    architecture: str = opt(DEFAULT_ARCHITECTURE, "frozen ImageNet backbone: a name from `retrain backbones` "
                            "(the codelab's mobilenet_<width>_<size> and inception_v3 too), built-in ones joined "
                            "with '+' (features side by side; --fine-tune trains the first), or an .onnx image "
                            "classifier or feature extractor: a path or an https:// URL", "--architecture")
    bottleneck_tensor: str | None = opt(None, "ONNX backbone: the tensor taken as features (default: found: the "
                                        "input of the final Gemm/MatMul, or the model's output)", metavar="NAME")
    input_mean: str | None = opt(None, "ONNX backbone: subtracted from 0..255 pixels, a number or R,G,B, each "
                                 "-1e4 to 1e4 (default: the model's metadata, else ImageNet's "
                                 "123.675,116.28,103.53)", "--input_mean", metavar="MEAN")
    input_std: str | None = opt(None, "ONNX backbone: pixels are then divided by this, a number or R,G,B, each "
                                "1e-6 to 1e4 (default: the model's metadata, else ImageNet's 58.395,57.12,57.375)",
                                "--input_std", metavar="STD")
    input_height: int | None = opt(None, "input height in pixels. ONNX backbone: default the graph's, else 224. "
                                   "Built-in EfficientNet-Lite: any side 32-1024 (default: above the training size "
                                   "for head-only fits, e.g. 288 for lite0, the training size with --fine-tune)",
                                   "--input_height", range=(16, 4096))
    input_width: int | None = opt(None, "input width in pixels; retrain needs it equal to the height",
                                  "--input_width", range=(16, 4096))
    cache_dir: str | None = opt(None, "bottleneck cache folder (default: user cache folder)",
                                "--bottleneck_dir")
    features: str | None = opt(None, "train from a feature store made by retrain embed (a folder or a URI such "
                               "as s3://...), with no photos; in place of IMAGE_DIR", metavar="STORE")
    ray: str | None = opt(None, "compute the bottlenecks missing from the cache on a Ray cluster (its head's "
                          "HOST:PORT, e.g. 10.0.0.5:6379; auto: the cluster this machine belongs to), into the cache; "
                          "the rest of fit runs here. Every node needs retrain[ray] and the photos at the same paths",
                          metavar="ADDRESS")
    batch_size: int = opt(8, "images per backbone batch when computing bottlenecks (8 is fastest on a CPU)",
                     range=(1, 1024))
    bottleneck_precision: str = opt("auto", "auto: bf16 on CPUs with bf16 units (AMX, AVX-512 BF16; "
                                    "run by OpenVINO, the model stays fp32), else fp32; int8: a backbone "
                                    "quantized once (calibrated on photos shipped with retrain), the model "
                                    "is built on it", choices=("auto", "fp32", "bf16", "int8"))
    workers: int = opt(0, "image-decoding threads (0: one per core, at most 4)", range=(0, 256))
    provider: str = opt("auto", "ONNX Runtime execution provider", choices=("auto", "cpu", "cuda", "tensorrt"))
    # --- final layer
    optimizer: str = opt("auto", "lbfgs: full-batch L-BFGS with L2 chosen on validation (best "
                         "without tuning); sgd: the codelab's mini-batch gradient descent; stream (with "
                         "--features): mini-batch Adam over the store's row groups, memory bounded; auto: sgd "
                         "when --learning_rate or --how_many_training_steps is given, with --features stream "
                         "beyond 2 GB of features, else lbfgs",
                         choices=("auto", "lbfgs", "sgd", "stream"))
    learning_rate: float | None = opt(None, "sgd learning rate (codelab default 0.01); with --fine-tune, "
                                      "the head's fine-tuning rate (default 6e-4)", "--learning_rate",
                                      range=(1e-9, 100))
    how_many_training_steps: int | None = opt(None, "sgd steps (codelab default 4000); lbfgs "
                                              "iteration cap (default 500)", "--how_many_training_steps",
                                              range=(1, 10_000_000))
    train_batch_size: int = opt(100, "sgd images per step", "--train_batch_size", range=(1, 1_000_000))
    validation_batch_size: int = opt(-1, "validation images per evaluation (-1: all)",
                                     "--validation_batch_size", range=(1, 10_000_000, -1))
    test_batch_size: int = opt(-1, "test images used for the final test (-1: all)", "--test_batch_size",
                              range=(1, 10_000_000, -1))
    eval_step_interval: int = opt(10, "report train/validation accuracy every N steps",
                                  "--eval_step_interval", range=(1, 10_000_000))
    l2: float | None = opt(None, "L2 strength of the final layer (default: chosen on validation)",
                          range=(0, 1e4))
    seed: int = opt(0, "random seed: same seed, same data -> same model", range=(0, 2**32 - 1))
    cross_validate_below: int = opt(50, "small data: when the smallest class has fewer photos than this, "
                                    "L2 is chosen by k-fold cross-validation, the head trains on every photo "
                                    "and the cross-validated accuracy is reported (0: always the fixed split; "
                                    "--fine-tune and sgd keep the fixed split)", range=(0, 1_000_000))
    cv_folds: int = opt(5, "folds of that cross-validation", range=(2, 20))
    # --- outputs
    final_tensor_name: str = opt("final_result", "name of the model's output", "--final_tensor_name")
    output_graph: str | None = opt(None, "also copy model.onnx here", "--output_graph")
    output_labels: str | None = opt(None, "also copy labels.txt here", "--output_labels")
    summaries_dir: str | None = opt(None, "TensorBoard event folder", "--summaries_dir")
    print_misclassified_test_images: bool = opt(False, "list misclassified test images",
                                                "--print_misclassified_test_images")
    quiet: bool = opt(False, "no progress bars or messages, only the summary line", "-q")
    # --- distortions (codelab flags; cached views)
    flip_left_right: bool = opt(False, "randomly mirror training images", "--flip_left_right")
    random_crop: float = opt(0.0, "percent of the image to randomly crop away", "--random_crop",
                              range=(0, 100))
    random_scale: float = opt(0.0, "percent by which to randomly scale up", "--random_scale",
                               range=(0, 100))
    random_brightness: float = opt(0.0, "percent by which to randomly vary brightness",
                                   "--random_brightness", range=(0, 100))
    augment: int = opt(0, "distorted views cached per training image (0: 4 when a distortion "
                       "flag is set; N alone: mirror + 10% crop, scale, brightness)", range=(0, 32))
    # --- imbalance, calibration, test-time augmentation
    class_weights: str = opt("none", "balanced: each class weighs the same in the loss", "--class_weights",
                             choices=("none", "balanced"))
    no_calibration: bool = opt(False, "skip temperature scaling (by default a temperature is fitted on "
                               "held-out predictions so that scores match accuracy)")
    unknown_precision: float | None = opt(None, "also answer 'unknown' under a top-score threshold chosen "
                                          "on validation for this precision (e.g. 0.95); it catches doubtful "
                                          "photos of the classes, the novelty (--unknown-coverage) photos of none",
                                          "--unknown_precision", range=(1e-6, 1 - 1e-6))
    unknown_coverage: float = opt(0.95, "open-set rejection: answer 'unknown' for photos unlike the training "
                                  "photos (a novelty score from the features, a second output of the model); "
                                  "the threshold keeps this share of in-distribution photos", range=(0.5, 1.0))
    no_unknown: bool = opt(False, "no novelty score: the model never answers 'unknown' unless --unknown-precision")
    no_label_check: bool = opt(False, "skip the list of possibly mislabelled photos in the report (saves about "
                               "2 s on the flowers: out-of-fold heads and the cleanlab import)")
    unknown_examples: str | None = opt(None, "folder of photos that belong to none of the classes (never trained "
                                       "as a class): they tighten the novelty threshold, by at most 5 points of coverage",
                                       metavar="DIR")
    tta: bool = opt(False, "record test-time augmentation (mirror averaging) in the model; label and "
                    "evaluate then use it by default")
    # --- fine-tuning (needs torch)
    fine_tune: bool = opt(False, "also train the last backbone blocks (slower, more accurate)", "--fine_tune")
    unfreeze: int = opt(8, "backbone blocks unfrozen by --fine-tune, counted from the end (with the "
                        "final 1x1 convolution)", range=(1, 16))
    epochs: int = opt(8, "fine-tuning epochs (fewer when validation stops improving in the second half)",
                     range=(1, 1000))
    resume: bool = opt(False, "continue an interrupted --fine-tune from its checkpoint")
    fine_tune_bf16: bool = opt(False, "fine-tune with bf16 autocast on CPUs with bf16 units (AMX, AVX-512 BF16). "
                                "Off by default: float32 trained as fast on 2 cores and rounds alike on every "
                                "machine (BENCHMARKS.md, issue 15)", "--bf16")
    nproc: int = opt(1, "--fine-tune on N processes (PyTorch DDP: gloo on CPU, NCCL on GPUs), each with cores/N "
                     "threads and its share of every batch; the same recipe and result as one process",
                     range=(1, 64))

    def to_dict(self) -> dict:
        return asdict(self)

    def distortions_requested(self) -> bool:
        return bool(self.flip_left_right or self.random_crop or self.random_scale
                    or self.random_brightness or self.augment)


def type_of(type_str: str):
    """The Python type of a setting from its annotation string ("float | None" -> float)."""
    t = str(type_str)
    for name, typ in (("bool", bool), ("int", int), ("float", float)):
        if t.startswith(name):
            return typ
    return str


def config_fields(cls=FitConfig):
    """(name, default, type-string, metadata) for each setting, in table order."""
    for f in fields(cls):
        default = None if f.default is MISSING else f.default
        yield f.name, default, f.type, f.metadata


# ------------------------------------------------------------------------------ the table as flags

def add_config_arguments(p, cls, raw_lists=()) -> None:
    """Flags for every field of a config dataclass: --name-with-dashes, --name_with_underscores,
    plus the aliases in its metadata. Defaults stay in the dataclass (argparse.SUPPRESS here)."""
    import argparse

    for name, default, type_str, meta in config_fields(cls):
        flags = [f"--{name.replace('_', '-')}"]
        for a in (f"--{name}", *meta.get("aliases", ())):
            if a not in flags:
                flags.append(a)
        t = str if name in raw_lists else type_of(type_str)  # sweep lists are parsed later
        help_ = f"{meta.get('help', '')} (default: {default})".replace("%", "%%")
        if t is bool:
            p.add_argument(*flags, dest=name, action="store_true", default=argparse.SUPPRESS, help=help_)
        else:
            p.add_argument(*flags, dest=name, type=_checked(t, flags[0]), default=argparse.SUPPRESS,
                           metavar=meta.get("metavar") or t.__name__.upper(), help=help_)


def _checked(t, flag):
    def convert(v):
        try:
            return t(v)
        except ValueError:
            raise ConfigError(f"{flag} expects a{'n' if t is int else ''} {t.__name__}, got '{v}'") from None
    return convert


def config_from_args(args, cls, raw_lists=()):
    """A config dataclass from the flags that were given; checks `choices` with suggestions."""
    given = {}
    for name, _default, _t, meta in config_fields(cls):
        if hasattr(args, name):
            v = getattr(args, name)
            choices = meta.get("choices")
            if isinstance(v, str) and "," in v and name in raw_lists:
                pass  # a sweep list: checked per value when expanded
            elif name in raw_lists and isinstance(v, str):
                t = type_of(_t)
                v = _checked(t, f"--{name}")(v) if t is not str else v
            if choices and not (isinstance(v, str) and "," in v) and v not in choices:
                raise ConfigError(f"--{name} must be one of {', '.join(choices)}, got '{v}'."
                                  f"{did_you_mean(v, choices)}")
            given[name] = v
    return cls(**given)
