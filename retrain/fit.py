"""`retrain fit`: scan -> bottlenecks -> split -> final layer (-> fine-tune) -> calibrate -> score
-> write the run folder.

`fit()` is the recipe: each stage is a function of its own that takes what the stages before it
made: the Plan and the Data in retrain.fit_data, the final layer, fine-tuning, scores and novelty
in retrain.final_layer, the run folder in retrain.fit_output. The final layer's maths is in
retrain.head, the run folder's files in retrain.run, the model file in retrain.model.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from retrain import callable_module
from retrain.config import FitConfig
from retrain.errors import ConfigError
from retrain.final_layer import (check_labels, choose_regime, cross_validate_final_layer, final_layer_on_fine_tuned,
                                 fine_tune_backbone, fit_novelty, refit_final_layer, score, train_final_layer)
from retrain.fit_data import load_data, plan_fit, validate_config
from retrain.fit_output import copy_codelab_outputs, export_check_inputs, write_run
from retrain.progress import Log, in_background


def fit(cfg: FitConfig, *, log=None) -> dict:
    """Train a classifier as `cfg` says and write its run folder. Returns the report dict.

        >>> import retrain
        >>> report = retrain.fit(retrain.FitConfig(image_dir="flower_photos", output="runs/flowers"))
        >>> report["metrics"]["test"]["accuracy"]
    """
    log = log or Log(cfg.quiet)
    t_start = time.perf_counter()
    plan = plan_fit(cfg)
    data = load_data(plan, log)
    check = in_background(export_check_inputs, plan, data, log)  # on the idle core, while the head trains
    regime = choose_regime(plan, data, log)
    ft = None
    if regime["name"] == "cross-validation":
        head, train_info, history, calibration, metrics = cross_validate_final_layer(plan, data, log)
    else:
        head, train_info, history = train_final_layer(plan, data, log)
        selection = head
        if cfg.fine_tune:
            tuned, ft = fine_tune_backbone(plan, data, head, train_info, log)
            head, selection = final_layer_on_fine_tuned(plan, data, tuned, train_info, log)
        elif train_info["optimizer"] == "lbfgs":
            head = refit_final_layer(plan, data, train_info, log)
        from retrain.calibrate import calibrate_head

        calibration = calibrate_head(selection, data.X, data.y, *data.split, cfg, log=log)
        metrics = score(head, data, calibration["temperature"], selection=selection)
    train_info["regime"] = regime
    # Mislabelled photos (out-of-fold heads on the final features) on the other core, while the
    # novelty score is fitted and the model is written and verified.
    l2 = train_info.get("refit", train_info).get("l2")  # that of the final layer (after fine-tuning, its own)
    labels = None if cfg.no_label_check else in_background(check_labels, data, l2, cfg.seed, log)
    novelty = fit_novelty(plan, data, ft, log)
    report = write_run(plan, data, head, ft, train_info=train_info, history=history, calibration=calibration,
                       metrics=metrics, check=check, t_start=t_start, log=log, novelty=novelty,
                       label_check=labels)
    copy_codelab_outputs(plan)
    return report


# ---------------------------------------------------------------------------------------- CLI

SWEEPABLE = ("learning_rate", "architecture", "how_many_training_steps", "train_batch_size", "l2",
             "optimizer", "seed")


def add_arguments(p) -> None:
    from retrain.config import add_config_arguments

    p.add_argument("image_dir_pos", nargs="?", metavar="IMAGE_DIR",
                   help="folder with one subfolder of photos per class")
    add_config_arguments(p, FitConfig, raw_lists=SWEEPABLE)


def expand_sweep(cfg: FitConfig) -> list[FitConfig]:
    """Comma lists in sweepable flags (--learning_rate 0.005,0.1,1.0) -> one config per combination.

    Each run goes to <output>/<flag>=<value>[,...]; bottlenecks are shared through the cache.
    """
    import dataclasses
    import itertools

    from retrain.config import config_fields, type_of

    types = {n: type_of(t) for n, _d, t, _m in config_fields(FitConfig)}
    axes = {}
    for name in SWEEPABLE:
        v = getattr(cfg, name)
        if isinstance(v, str) and "," in v:
            try:
                axes[name] = [types[name](x.strip()) for x in v.split(",") if x.strip()]
            except ValueError:
                raise ConfigError(f"--{name}: cannot read '{v}' as a list of {types[name].__name__}") from None
    if not axes:
        return [cfg]
    base = Path(cfg.output or Path("runs") / Path(cfg.image_dir or cfg.features).resolve().name)
    out = []
    for combo in itertools.product(*axes.values()):
        changes = dict(zip(axes, combo))
        tag = ",".join(f"{k}={v}" for k, v in changes.items())
        summaries = str(Path(cfg.summaries_dir) / tag) if cfg.summaries_dir else None  # one TensorBoard run each
        out.append(dataclasses.replace(cfg, **changes, output=str(base / tag), summaries_dir=summaries))
    return out


def main(args) -> int:
    from retrain.config import config_from_args

    cfg = config_from_args(args, FitConfig, raw_lists=SWEEPABLE)
    if args.image_dir_pos:
        if cfg.image_dir and cfg.image_dir != args.image_dir_pos:
            raise ConfigError(f"two image folders given ({args.image_dir_pos} and --image_dir {cfg.image_dir})")
        cfg.image_dir = args.image_dir_pos
    log = Log(cfg.quiet)
    runs = expand_sweep(cfg)
    if len(runs) > 1:
        _check_sweep(runs)  # a typo in the last value fails now, not after the first runs trained
        log(f"Sweep: {len(runs)} runs")
        for c in runs:
            _main_one(c, log)
        return 0
    return _main_one(cfg, log)


def _check_sweep(runs: list[FitConfig]) -> None:
    from retrain.architectures import get_backbone
    from retrain.config import config_fields
    from retrain.errors import did_you_mean

    choices = {n: m.get("choices") for n, _d, _t, m in config_fields(FitConfig) if n in SWEEPABLE}
    for c in runs:
        for name, allowed in choices.items():
            v = getattr(c, name)
            if allowed and v not in allowed:
                raise ConfigError(f"--{name} must be one of {', '.join(allowed)}, got '{v}'.{did_you_mean(v, allowed)}")
        validate_config(c)
        get_backbone(c.architecture, tensor=c.bottleneck_tensor, mean=c.input_mean, std=c.input_std,
                     height=c.input_height, width=c.input_width)


def _main_one(cfg: FitConfig, log) -> int:
    report = fit(cfg, log=log)
    te = report["metrics"]["test"]
    if cfg.print_misclassified_test_images and te["misclassified"]:
        print("=== MISCLASSIFIED TEST IMAGES ===")
        for r in te["misclassified"]:
            print(f"{r['path']:>70}  {r['true']} -> {r['predicted']} ({r['confidence']:.3f})")
    for sk in report["skipped"]:
        log(f"skipped {sk['path']}: {sk['reason']}")
    print(summary_line(report), file=sys.stdout)
    return 0


def summary_line(report: dict) -> str:
    """fit's one line on stdout: the figure that says how good the model is, and which regime
    made it (a fixed split's test accuracy, or the cross-validated accuracy of small data)."""
    n = sum(report["class_counts"].values())
    te, va = report["metrics"]["test"], report["metrics"]["validation"]
    regime = report["train"].get("regime") or {"name": "fixed split", "why": ""}
    head = f"retrain fit: {n} images, {len(report['labels'])} classes, {len(report['skipped'])} skipped, "
    tail = f", {report['timings']['total_s']:.1f} s -> {report['output']}"
    cv = report["metrics"].get("cross_validation")
    if regime["name"] == "cross-validation" and cv:
        lo, hi = cv["interval_95"]
        return (head + f"cross-validated accuracy {cv['accuracy'] * 100:.1f}% (95% interval {lo * 100:.1f}%-"
                f"{hi * 100:.1f}%; {cv['folds']}-fold, n={cv['n']}), small data ({regime['why']}): trained on "
                f"every photo" + tail)
    refit = " and refitted on train + validation" if report["train"].get("refit") else ""
    return (head + f"test accuracy {te['accuracy'] * 100:.1f}% (n={te['n']}), fixed split ({regime['why']}): "
            f"chosen on validation ({va['accuracy'] * 100:.1f}%){refit}" + tail)


callable_module(__name__, fit)  # retrain.fit(...) is fit(...)
