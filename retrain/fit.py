"""`retrain fit`: scan -> bottlenecks -> split -> final layer (-> fine-tune) -> calibrate -> score
-> write the run folder.

`fit()` is the recipe: each stage below is a function of its own, in the order it runs, that
takes what the stages before it made. The final layer's maths is in retrain.head, the run
folder's files in retrain.run, the model file in retrain.model.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from retrain import callable_module
from retrain.config import FitConfig, check_ranges
from retrain.errors import ConfigError
from retrain.head import LBFGS_MAX_ITER, SGD_LEARNING_RATE, SGD_STEPS, Head, train_lbfgs, train_sgd
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
        if cfg.fine_tune:
            head, ft = fine_tune_backbone(plan, data, head, train_info, log)
        from retrain.calibrate import calibrate_head

        calibration = calibrate_head(head, data.X, data.y, *data.split, cfg, log=log)
        selection = head
        if not ft and train_info["optimizer"] == "lbfgs":
            head = refit_final_layer(plan, data, train_info, log)
        metrics = score(head, data, calibration["temperature"], selection=selection)
    train_info["regime"] = regime
    # Mislabelled photos (out-of-fold heads on the final features) on the other core, while the
    # novelty score is fitted and the model is written and verified.
    labels = None if cfg.no_label_check else in_background(check_labels, data, train_info.get("l2"), cfg.seed, log)
    novelty = fit_novelty(plan, data, ft, log)
    report = write_run(plan, data, head, ft, train_info=train_info, history=history, calibration=calibration,
                       metrics=metrics, check=check, t_start=t_start, log=log, novelty=novelty,
                       label_check=labels)
    copy_codelab_outputs(plan)
    return report


# ------------------------------------------------------------------------------ the stages

def plan_fit(cfg: FitConfig, log=None) -> Plan:
    """Check the flags and where the run goes; settle precision, backbone and optimizer."""
    from retrain import augment
    from retrain.bottlenecks import plan_backbone
    from retrain.bottlenecks import choose_precision

    validate_config(cfg)
    out = check_outputs(cfg)  # refused before any work: a user's folder is never replaced
    precision = choose_precision(cfg.bottleneck_precision, provider=cfg.provider, fine_tune=cfg.fine_tune)
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
    from retrain.split import check_class_sizes, split_items

    cfg, bb = plan.cfg, plan.backbone
    if cfg.features:  # a feature store (retrain embed): no photos, no bottleneck cache
        from retrain.streamfit import load_store

        return Data(**load_store(plan, log))
    timings = {}
    cache = BottleneckCache(cfg.cache_dir or default_cache_dir(), bb, precision=plan.precision, log=log)
    if not len(cache):  # an empty cache: every photo will need the backbone, so build it while scanning
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
    feats, failures, btiming = extract(s.items, bb, cache, provider=cfg.provider, batch_size=cfg.batch_size,
                                       workers=cfg.workers or None, quiet=cfg.quiet, log=log)
    timings["bottlenecks_s"] = round(time.perf_counter() - t0, 3)
    if btiming.get("computed"):
        log(f"Bottlenecks: {btiming['computed']} computed in {btiming.get('seconds', 0):.1f} s "
            f"({btiming['computed'] / max(btiming.get('seconds', 1e-9), 1e-9):.0f} images/s), "
            f"{btiming['cached']} from cache")
    skipped = s.skipped + [{"path": p, "reason": r} for p, r in failures.items()]
    ok = [i for i, it in enumerate(s.items) if it.path not in failures]
    items = [s.items[i] for i in ok]

    assign = split_items(items, validation_percentage=cfg.validation_percentage,
                         testing_percentage=cfg.testing_percentage, classes=s.classes)
    y = np.array([s.classes.index(it.label) for it in items], dtype=np.int64)
    parts = {name: np.array([i for i, it in enumerate(items) if assign[it.path] == name], dtype=np.int64)
             for name in ("train", "validation", "test")}
    if cfg.test_batch_size and cfg.test_batch_size > 0 and len(parts["test"]) > cfg.test_batch_size:
        rng = np.random.default_rng(cfg.seed)
        parts["test"] = np.sort(rng.choice(parts["test"], cfg.test_batch_size, replace=False))
    log(f"Split: {len(parts['train'])} train, {len(parts['validation'])} validation, {len(parts['test'])} test")
    return Data(s, cache, items, feats[ok], y, s.classes, parts, skipped, warnings_, btiming, timings)


def train_final_layer(plan: Plan, data: Data, log) -> tuple[Head, dict, list]:
    """The softmax layer on the training bottlenecks (plus cached distorted views, if asked for):
    L-BFGS with L2 chosen on validation, or the codelab's SGD. Returns (head, info, history)."""
    cfg = plan.cfg
    if plan.optimizer == "stream":  # fit --features of a store beyond memory
        from retrain.streamfit import train_streamed

        return train_streamed(plan, data, log)
    tr, va, _ = data.split
    Xtr, ytr = data.X[tr], data.y[tr]
    views_info = None
    if plan.views:
        Xv, yv, views_info = distorted_views(plan, data, log)
        Xtr, ytr = np.concatenate([Xtr, Xv]), np.concatenate([ytr, yv])

    t0 = time.perf_counter()
    k = len(data.labels)
    weights = cfg.class_weights if cfg.class_weights != "none" else None
    if plan.optimizer == "lbfgs":
        log(f"Training the final layer (L-BFGS, L2 {'chosen on validation' if cfg.l2 is None else cfg.l2})")
        head, l2, history, grid = train_lbfgs(Xtr, ytr, data.X[va], data.y[va], k, l2=cfg.l2,
                                              max_iter=cfg.how_many_training_steps or LBFGS_MAX_ITER,
                                              eval_every=cfg.eval_step_interval, weights=weights, log=log)
        info = {"optimizer": "lbfgs", "l2": l2, "grid": grid, "steps": history[-1]["step"]}
    else:
        lr = cfg.learning_rate if cfg.learning_rate is not None else SGD_LEARNING_RATE
        steps = cfg.how_many_training_steps or SGD_STEPS
        log(f"Training the final layer (SGD, learning rate {lr}, {steps} steps, batch {cfg.train_batch_size})")
        head, history = train_sgd(Xtr, ytr, data.X[va], data.y[va], k, learning_rate=lr, steps=steps,
                                  batch_size=cfg.train_batch_size, eval_every=cfg.eval_step_interval,
                                  validation_batch_size=cfg.validation_batch_size, seed=cfg.seed,
                                  l2=cfg.l2 or 0.0, weights=weights, log=log, quiet=cfg.quiet)
        info = {"optimizer": "sgd", "learning_rate": lr, "steps": steps, "l2": cfg.l2 or 0.0}
    info["class_weights"] = cfg.class_weights
    if views_info:
        info["views"] = views_info
    data.timings["train_s"] = round(time.perf_counter() - t0, 3)
    return head, info, history


def distorted_views(plan: Plan, data: Data, log, idx=None) -> tuple[np.ndarray, np.ndarray, dict]:
    """Bottlenecks of cached distorted views of the training photos (never validation or test
    while they choose; `idx`: the photos the final layer is refitted on).
    Returns (features (m, C), labels (m,), info for the report)."""
    from retrain.bottlenecks import extract_views

    cfg, tr = plan.cfg, (data.parts["train"] if idx is None else idx)
    t0 = time.perf_counter()
    log(f"Distortions: {plan.views} cached views per training image ({plan.distortions.tag()})")
    V, timing = extract_views([data.items[i] for i in tr], plan.views, plan.distortions, plan.backbone,
                              data.cache, provider=cfg.provider, batch_size=cfg.batch_size,
                              workers=cfg.workers or None, quiet=cfg.quiet, log=log)
    good = np.isfinite(V).all(axis=2)  # (n_train, views)
    y = np.repeat(data.y[tr], plan.views).reshape(len(tr), plan.views)[good]
    data.timings["views_s"] = round(time.perf_counter() - t0, 3)
    if timing.get("computed"):
        log(f"Distorted views: {timing['computed']} computed in {timing.get('seconds', 0):.1f} s, "
            f"{timing['cached']} from cache")
    return V[good], y, {"views_per_image": plan.views, "distortions": plan.distortions.tag(), "timing": timing}


def fine_tune_backbone(plan: Plan, data: Data, head: Head, train_info: dict, log):
    """Train the last backbone blocks with the head (retrain.finetune), starting from `head`.
    Replaces data.X by the fine-tuned features. Returns (the new head, FineTuneResult)."""
    from retrain import augment
    from retrain.finetune import DEFAULT_DISTORTIONS, DEFAULT_VIEWS, fine_tune

    t0 = time.perf_counter()
    W0, b0 = head.folded()
    # Fine-tuning without distortion flags still trains on a few cached distorted views.
    d, views = ((plan.distortions, plan.views) if plan.views
                else (augment.Distortions(**DEFAULT_DISTORTIONS), DEFAULT_VIEWS))
    ft = fine_tune(plan.cfg, plan.backbone, data.items, data.y, data.parts, W0=W0, b0=b0, views=views,
                   distortions=d, cache_dir=data.cache.folder.parent, checkpoint=checkpoint_path(plan.out), log=log)
    data.X = ft.features
    C = data.X.shape[1]
    train_info["fine_tune"] = ft.info | {"history": ft.history}
    data.timings["fine_tune_s"] = round(time.perf_counter() - t0, 3)
    return Head(ft.W.astype(np.float64), ft.b.astype(np.float64), np.zeros(C), np.ones(C)), ft


def score(head: Head, data: Data, temperature: float, selection: Head | None = None) -> dict:
    """Metrics of every split, with the calibrated probabilities (the test split only measured).

    `selection`: the head the choices were made with (trained on the training split only);
    it scores the validation split, which the final `head` (refitted on train + validation)
    has learnt from. The test split is scored by the final head, once."""
    from retrain.evaluate import compute_metrics

    paths = [it.path for it in data.items]
    metrics = {}
    for name, idx in data.parts.items():
        h = selection if (selection is not None and name == "validation") else head
        m = compute_metrics(data.y[idx], h.probs(data.X[idx], temperature), data.labels, [paths[i] for i in idx])
        m["per_class_recall"] = {c: v["recall"] for c, v in m["per_class"].items()}
        if selection is not None and selection is not head:
            m["scored_by"] = ("the selection head (trained on the training split only)" if name == "validation"
                              else "the final head (trained on train + validation)")
        metrics[name] = m
    return metrics


def choose_regime(plan: Plan, data: Data, log) -> dict:
    """"fixed split" (choose on validation, refit on train + validation, score the test split
    once) or, below --cross-validate-below photos in the smallest class, "cross-validation"
    (choose by k-fold cross-validation, train on every photo, report the cross-validated
    accuracy): a fixed split of a few photos per class wastes most of them."""
    cfg = plan.cfg
    smallest = int(np.bincount(data.y, minlength=len(data.labels)).min()) if len(data.y) else 0
    small = smallest < cfg.cross_validate_below
    if small and cfg.fine_tune:
        why = f"smallest class {smallest} photos, but --fine-tune chooses its epoch on the validation split"
    elif small and plan.optimizer != "lbfgs":
        why = f"smallest class {smallest} photos, but the codelab's sgd keeps its validation split"
    elif small:
        r = {"name": "cross-validation", "why": f"smallest class {smallest} photos < {cfg.cross_validate_below}",
             "folds": cfg.cv_folds, "smallest_class": smallest}
        log(f"Small data ({r['why']}): L2 chosen by {cfg.cv_folds}-fold cross-validation, "
            "the final layer trained on every photo")
        return r
    else:
        why = f"smallest class {smallest} photos >= {cfg.cross_validate_below}"
    return {"name": "fixed split", "why": why, "smallest_class": smallest}


def refit_final_layer(plan: Plan, data: Data, train_info: dict, log) -> Head:
    """The final L-BFGS head refitted on train + validation (and their cached views) with the
    L2 strength chosen on validation: the model learns from every photo it may use."""
    cfg = plan.cfg
    tr, va, _ = data.split
    if not len(va):
        return train_lbfgs(data.X[tr], data.y[tr], data.X[va], data.y[va], len(data.labels), l2=train_info["l2"],
                           weights=cfg.class_weights if cfg.class_weights != "none" else None)[0]
    t0 = time.perf_counter()
    idx = np.concatenate([tr, va])
    X, y = data.X[idx], data.y[idx]
    views = None
    if plan.views:
        Xv, yv, views = distorted_views(plan, data, log, idx)
        X, y = np.concatenate([X, Xv]), np.concatenate([y, yv])
    weights = cfg.class_weights if cfg.class_weights != "none" else None
    head = train_lbfgs(X, y, X[:0], y[:0], len(data.labels), l2=train_info["l2"],
                       max_iter=cfg.how_many_training_steps or LBFGS_MAX_ITER, weights=weights)[0]
    train_info["refit"] = {"on": "train + validation", "n": int(len(idx)), "l2": train_info["l2"],
                           "seconds": round(time.perf_counter() - t0, 3)}
    if views:
        train_info["refit"]["views"] = views["timing"]
    log(f"Final layer refitted on train + validation ({len(idx)} photos, L2 {train_info['l2']:g})")
    data.timings["train_s"] = round(data.timings.get("train_s", 0) + time.perf_counter() - t0, 3)
    return head


def cross_validate_final_layer(plan: Plan, data: Data, log):
    """Small data: L2 by stratified k-fold cross-validation over every photo (cached bottlenecks,
    seconds), the final head on every photo, temperature and threshold from the out-of-fold
    predictions. Returns (head, train info, history, calibration, metrics); metrics hold the
    out-of-fold predictions: "cross_validation" over every photo, and "validation" / "test" over
    those splits' photos (each predicted by a head that did not see it); "train" is the final head
    on the training split."""
    from retrain.calibrate import calibrate_out_of_fold
    from retrain.evaluate import compute_metrics
    from retrain.head import cross_validate, wilson_interval

    cfg = plan.cfg
    t0 = time.perf_counter()
    k, X, y = len(data.labels), data.X, data.y
    weights = cfg.class_weights if cfg.class_weights != "none" else None
    folds = max(2, min(cfg.cv_folds, len(y)))
    log(f"Training the final layer (L-BFGS, L2 {'chosen by cross-validation' if cfg.l2 is None else cfg.l2})")
    cv = cross_validate(X, y, k, folds=folds, l2=cfg.l2, weights=weights, seed=cfg.seed,
                        max_iter=cfg.how_many_training_steps or LBFGS_MAX_ITER, log=log)
    Xall, yall = X, y
    views_info = None
    if plan.views:
        every = np.arange(len(y))
        Xv, yv, views_info = distorted_views(plan, data, log, every)
        Xall, yall = np.concatenate([X, Xv]), np.concatenate([y, yv])
    head, l2, history, _grid = train_lbfgs(Xall, yall, X[:0], y[:0], k, l2=cv["l2"],
                                           max_iter=cfg.how_many_training_steps or LBFGS_MAX_ITER,
                                           eval_every=cfg.eval_step_interval, weights=weights)
    # The final head has no validation split: its curve is the training one alone.
    history = [h | {"validation_accuracy": None, "validation_cross_entropy": None} for h in history]
    data.timings["train_s"] = round(time.perf_counter() - t0, 3)
    calibration = calibrate_out_of_fold(cv["logits"], y, data.parts, cfg, log=log)
    T = calibration["temperature"]
    paths = [it.path for it in data.items]
    P_oof = softmax_rows(cv["logits"] / T)

    def metrics_of(idx, P, how):
        m = compute_metrics(y[idx], P, data.labels, [paths[i] for i in idx])
        m["per_class_recall"] = {c: v["recall"] for c, v in m["per_class"].items()}
        m["scored_by"] = how
        return m

    oof = f"out-of-fold predictions ({folds}-fold cross-validation)"
    tr = data.parts["train"]
    metrics = {"train": metrics_of(tr, head.probs(X[tr], T), "the final head (trained on every photo)")}
    for name in ("validation", "test"):
        metrics[name] = metrics_of(data.parts[name], P_oof[data.parts[name]], oof)
    cvm = metrics_of(np.arange(len(y)), P_oof, oof)
    correct = int(round(cvm["accuracy"] * cvm["n"]))
    lo, hi = wilson_interval(correct, cvm["n"])
    cvm |= {"folds": folds, "interval_95": [lo, hi], "interval_method": "Wilson score, 95%"}
    metrics["cross_validation"] = cvm
    info = {"optimizer": "lbfgs", "l2": l2, "grid": [{"l2": g["l2"], "validation_accuracy": g["accuracy"],
                                                     "validation_cross_entropy": g["cross_entropy"],
                                                     "cross_validated": True} for g in cv["grid"]],
            "steps": history[-1]["step"], "class_weights": cfg.class_weights,
            "cross_validation": {"folds": folds, "seed": cfg.seed, "grid": cv["grid"], "chosen_l2": cv["l2"]},
            "refit": {"on": "every photo", "n": int(len(y)), "l2": l2}}
    if views_info:
        info["views"] = views_info
    log(f"  {folds}-fold cross-validated accuracy {cvm['accuracy']:.1%} (95% interval {lo:.1%}-{hi:.1%}, "
        f"n={cvm['n']}) at L2 {l2:g}; final layer trained on all {len(y)} photos")
    return head, info, history, calibration, metrics


def softmax_rows(z: np.ndarray) -> np.ndarray:
    from retrain.head import softmax

    return softmax(np.asarray(z, np.float64))


def write_run(plan: Plan, data: Data, head: Head, ft, *, train_info, history, calibration, metrics, check,
              t_start, log, novelty=None, label_check=None) -> dict:
    """model.onnx (verified against the head), labels, split, report and report.html, written
    beside the destination and swapped in whole (retrain.run)."""
    from retrain.model import write_model
    from retrain.report import write_run_html
    from retrain.run import MODEL, Run, RunWriter

    cfg, bb = plan.cfg, plan.backbone
    t0 = time.perf_counter()
    temperature = calibration["temperature"]
    summary_metrics = {name: {"accuracy": m["accuracy"], "cross_entropy": m["cross_entropy"], "n": m["n"]}
                       for name, m in metrics.items()}
    with RunWriter(plan.out, image_dir=data.scan.root) as tmp:
        W, b = head.folded()
        check_imgs, check_idx, check_feats = check.result()
        expected = head.probs(data.X[check_idx] if check_feats is None else check_feats, temperature)
        expected = (expected,) if novelty is None else (  # the novelty output is checked too
            expected, novelty.score(data.X[check_idx] if check_feats is None else check_feats))
        extra_meta = {"optimizer": train_info["optimizer"], "temperature": temperature,
                      "tta": bool(cfg.tta), "fine_tuned": bool(ft)}
        if calibration.get("unknown_threshold") is not None:
            extra_meta["unknown_threshold"] = calibration["unknown_threshold"]
        parity = write_model(tmp / MODEL, bb, W, b, labels=data.labels, metrics=summary_metrics,
                             output_name=cfg.final_tensor_name, check=(check_imgs, *expected),
                             extra_meta=extra_meta, temperature=temperature, precision=plan.precision,
                             fine_tuned=ft, novelty=novelty)
        run = Run(tmp)
        run.write_labels(data.labels)
        run.write_split(split_doc(cfg, data))
        data.timings["export_s"] = round(time.perf_counter() - t0, 3)
        label_issues = label_check.result() if label_check is not None else {"skipped": "not checked (--no-label-check)"}
        data.timings["total_s"] = round(time.perf_counter() - t_start, 3)
        report = build_report(plan, data, train_info=train_info, history=history, metrics=metrics,
                              calibration=calibration, parity=parity)
        report["novelty"] = novelty.report if novelty is not None else {"off": "--no-unknown"}
        report["label_issues"] = label_issues
        if cfg.summaries_dir:
            from retrain.summaries import write_summaries  # TensorBoard events

            write_summaries(cfg.summaries_dir, report, features=data.X, y=data.y,
                            paths=[it.path for it in data.items], parts=data.parts, head=head)
        run.write_report(report)
        write_run_html(tmp, report)
    if ft is not None:
        checkpoint_path(plan.out).unlink(missing_ok=True)  # finished: nothing left to resume
    return report


def check_labels(data: Data, l2, seed: int, log) -> dict:
    """report["label_issues"]: photos whose folder the out-of-fold heads disagree with
    (retrain.mislabels), or {"skipped": why}."""
    from retrain.mislabels import for_run

    return for_run(data.X, data.y, [it.path for it in data.items], data.labels, l2=l2, seed=seed, log=log)


def fit_novelty(plan: Plan, data: Data, ft, log):
    """The novelty score (retrain.novelty) on the features the model's backbone computes: the
    references and the threshold (at --unknown-coverage, tightened by --unknown-examples), with
    the open-set protocol measured. None with --no-unknown."""
    from retrain import novelty

    cfg = plan.cfg
    if cfg.no_unknown:
        return None
    t0 = time.perf_counter()
    examples, info = unknown_example_features(plan, data, ft, log) if cfg.unknown_examples else (None, None)
    nov = novelty.fit(data.X, data.y, data.parts, data.labels, coverage=cfg.unknown_coverage,
                      digests=[it.digest for it in data.items], examples=examples, examples_info=info,
                      seed=cfg.seed, log=log)
    data.timings["novelty_s"] = round(time.perf_counter() - t0, 3)
    return nov


def unknown_example_features(plan: Plan, data: Data, ft, log) -> tuple[np.ndarray, dict]:
    """Features of the --unknown-examples photos, by the backbone the model will have (the
    bottleneck cache, or the fine-tuned graph), and what was read."""
    from retrain.bottlenecks import extract
    from retrain.novelty import list_photos
    from retrain.scan import ImageItem, digest_file

    cfg, bb = plan.cfg, plan.backbone
    items, skipped = [], []
    for p in list_photos(cfg.unknown_examples):
        try:
            digest, n = digest_file(p)
        except OSError as e:
            skipped.append({"path": p, "reason": str(e)})
            continue
        items.append(ImageItem(p, "(unknown examples)", digest, n))
    if ft is None:
        feats, failures, _ = extract(items, bb, data.cache, provider=cfg.provider, batch_size=cfg.batch_size,
                                     workers=cfg.workers or None, quiet=cfg.quiet, log=log)
    else:
        feats, failures = _fine_tuned_features(bb, ft, [it.path for it in items], cfg)
    skipped += [{"path": p, "reason": r} for p, r in failures.items()]
    ok = np.isfinite(feats).all(1)
    if not ok.any():
        from retrain.errors import DataError

        raise DataError(f"--unknown-examples {cfg.unknown_examples}: none of its {len(items) + len(skipped)} images "
                        "could be read" + (f" (e.g. {skipped[0]['path']}: {skipped[0]['reason']})" if skipped else ""))
    for sk in skipped:
        log(f"skipped {sk['path']}: {sk['reason']}")
    return feats[ok], {"folder": str(Path(cfg.unknown_examples).expanduser().resolve()), "skipped": skipped}


def _fine_tuned_features(bb, ft, paths: list[str], cfg) -> tuple[np.ndarray, dict]:
    """Features of photos through the fine-tuned backbone (its ONNX graph, run once here)."""
    import tempfile

    from retrain.finetune import fine_tuned_features_onnx
    from retrain.images import load
    from retrain.pipeline import run_pipeline
    from retrain.runtime import OnnxEngine, make_session

    feats = np.full((len(paths), bb.feature_dim), np.nan, np.float32)
    with tempfile.TemporaryDirectory(prefix="retrain-ft-") as tmp:
        graph = Path(tmp) / "features.onnx"
        fine_tuned_features_onnx(bb, ft, graph)
        engine = OnnxEngine(make_session(graph, provider=cfg.provider))

        def on_batch(idx, out):
            feats[idx] = out

        errors, _ = run_pipeline(list(range(len(paths))), lambda i: load(paths[i], bb.image_size, bb.crop_fraction),
                                 engine, batch_size=cfg.batch_size, workers=cfg.workers or None, mean=bb.mean,
                                 std=bb.std, on_batch=on_batch, desc="Unknown examples", quiet=cfg.quiet)
    return feats, {paths[i]: r for i, r in errors.items()}


def copy_codelab_outputs(plan: Plan) -> None:
    """--output_graph / --output_labels: copies of the run's model and labels, as retrain.py made."""
    from retrain.run import LABELS, MODEL, is_labels_file, is_retrain_model, write_user_file

    cfg = plan.cfg
    if cfg.output_graph:
        write_user_file(cfg.output_graph, (plan.out / MODEL).read_bytes(), flag="--output_graph",
                        looks_ours=is_retrain_model)
    if cfg.output_labels:
        write_user_file(cfg.output_labels, (plan.out / LABELS).read_bytes(), flag="--output_labels",
                        looks_ours=is_labels_file)


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
    need(not (cfg.fine_tune and cfg.bottleneck_precision not in ("auto", "fp32")),
         "--fine-tune trains the backbone in floating point: use it with --bottleneck-precision fp32")
    need(not cfg.resume or cfg.fine_tune, "--resume continues an interrupted --fine-tune; add --fine-tune")
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


def export_check_inputs(plan: Plan, data: Data, log):
    """Photos (uint8) on which the written model is checked against the trained head, their
    indices, and the features the head should see for them: None means the bottlenecks
    themselves; for bf16 bottlenecks, fp32 ones, since the model runs its backbone in fp32."""
    from retrain.images import load, normalize

    bb = plan.backbone
    if plan.cfg.features:  # the photos may be elsewhere: the calibration photos shipped with retrain
        from retrain.streamfit import check_inputs

        return check_inputs(plan, log)
    tr, va, _ = data.split
    idx = (va if len(va) else tr)[:8]
    imgs = np.stack([load(data.items[i].path, bb.image_size, bb.crop_fraction) for i in idx])
    if plan.precision != "bf16":
        return imgs, idx, None
    from retrain.bottlenecks import feature_session

    sess = feature_session(bb, provider="cpu", precision="fp32", log=log)
    return imgs, idx, sess(normalize(imgs, bb.mean, bb.std))


def _import(*modules: str) -> None:
    import importlib

    for m in modules:
        try:
            importlib.import_module(m)
        except ImportError:
            pass


def split_doc(cfg: FitConfig, data: Data) -> dict:
    import os

    labels = data.labels
    paths = [it.path for it in data.items]
    return {"rule": "codelab hash of file name (minus _nohash_ suffix), stratified; duplicates together",
            "validation_percentage": cfg.validation_percentage,
            "testing_percentage": cfg.testing_percentage,
            "counts": {n: {c: int((data.y[idx] == j).sum()) for j, c in enumerate(labels)}
                       for n, idx in data.parts.items()},
            "files": {n: [os.path.relpath(paths[i], data.scan.root) for i in idx] for n, idx in data.parts.items()}}


def build_report(plan: Plan, data: Data, *, train_info, history, metrics, calibration, parity) -> dict:
    """report.json's contents (retrain.run.Report documents every key)."""
    from retrain import __version__
    from retrain.runtime import device_description

    cfg, bb, s = plan.cfg, plan.backbone, data.scan
    n_img = len(s.items) + len(s.skipped)
    return {
        "retrain_version": __version__,
        "config": {**cfg.to_dict(), "optimizer": plan.optimizer},
        "image_dir": s.root,
        "output": str(plan.out),
        "architecture": bb.name,
        "backbone": bb.report_info(),
        "bottleneck_precision": plan.precision,
        "provider": cfg.provider,
        "labels": data.labels,
        "class_counts": s.counts(),
        "split_counts": {n: len(idx) for n, idx in data.parts.items()},
        "train": train_info,
        "history": history,
        "metrics": metrics,
        "calibration": calibration,
        "export_parity_max_abs_diff": parity,
        "timings": data.timings | {"bottleneck_detail": data.bottleneck_timing},
        "images_per_second": round(n_img / max(data.timings["total_s"], 1e-9), 1),
        "skipped": data.skipped,
        "ignored_files": s.ignored[:1000],
        "duplicates": s.duplicates(),
        "data_warnings": data.warnings,
        "device": device_description(cfg.provider, plan.precision),
        "cache_dir": str(data.cache.folder),
    }


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
