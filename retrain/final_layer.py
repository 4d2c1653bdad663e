"""`retrain fit`'s training stages, on the Data that retrain.fit_data made: the regime (a fixed
split, or cross-validation for small data), the softmax layer (trained, refitted on train +
validation, or cross-validated), cached distorted views, fine-tuning the backbone, the scores
of every split, and, on the final features, the label check and the novelty score.
The final layer's maths is in retrain.head; retrain.fit runs the stages in order.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from retrain.fit_data import Data, Plan, checkpoint_path
from retrain.head import LBFGS_MAX_ITER, SGD_LEARNING_RATE, SGD_STEPS, Head, train_lbfgs, train_sgd, weighted_sum

# After fine-tuning, the final layer may also be a weighted sum of the fine-tuned head's and the
# L-BFGS head's calibrated logits, with these weights of the fine-tuned one; validation chooses
# among them and the two heads alone (BENCHMARKS.md, issue 15, tenth pass: a sum in all 3 seeds).
BLEND_WEIGHTS = (0.25, 0.5, 0.75)


def loss_weights(cfg) -> str | None:
    """--class_weights as retrain.head takes it: None for "none"."""
    return cfg.class_weights if cfg.class_weights != "none" else None


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
    weights = loss_weights(cfg)
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
    """Train the last blocks of the backbone's tuned network with a head (retrain.finetune),
    starting from `head`, or, when other networks run frozen beside it (the default Lite0 +
    Lite1), from an L-BFGS head on its own features. Replaces its columns of data.X by the
    fine-tuned features. Returns (the fine-tuned head, on all of data.X's columns; FineTuneResult)."""
    from retrain import augment
    from retrain.finetune import DEFAULT_DISTORTIONS, DEFAULT_VIEWS
    from retrain.finetune_ddp import fine_tune  # retrain.finetune's, its epochs in --nproc processes

    t0 = time.perf_counter()
    tuned = plan.backbone.tuned_network
    C, C0 = data.X.shape[1], tuned.feature_dim
    start, start_info = (head, None) if C0 == C else start_head(plan, data, C0, log)
    W0, b0 = start.folded()
    # Fine-tuning without distortion flags still trains on a few cached distorted views.
    d, views = ((plan.distortions, plan.views) if plan.views
                else (augment.Distortions(**DEFAULT_DISTORTIONS), DEFAULT_VIEWS))
    ft = fine_tune(plan.cfg, tuned, data.items, data.y, data.parts, W0=W0, b0=b0, views=views,
                   distortions=d, cache_dir=data.cache.folder.parent, checkpoint=checkpoint_path(plan.out), log=log)
    data.X = ft.features if C0 == C else np.concatenate([ft.features, data.X[:, C0:]], axis=1)
    train_info["fine_tune"] = ft.info | {"network": tuned.name, "frozen_beside": list(plan.backbone.parts[1:]),
                                         "history": ft.history}
    if start_info:
        train_info["fine_tune"]["start_head"] = start_info
    data.timings["fine_tune_s"] = round(time.perf_counter() - t0, 3)
    W = np.zeros((C, ft.W.shape[1]))
    W[:C0] = ft.W  # the frozen networks' features have no weight in the head fine-tuning trained
    return Head(W, ft.b.astype(np.float64), np.zeros(C), np.ones(C)), ft


def start_head(plan: Plan, data: Data, C0: int, log) -> tuple[Head, dict]:
    """The head fine-tuning starts from when frozen networks run beside the tuned one: L-BFGS on
    the tuned network's features alone (the first C0 columns), L2 chosen on validation."""
    tr, va, _ = data.split
    X0 = data.X[:, :C0]
    head, l2, _, _ = train_lbfgs(X0[tr], data.y[tr], X0[va], data.y[va], len(data.labels), l2=plan.cfg.l2,
                                 max_iter=plan.cfg.how_many_training_steps or LBFGS_MAX_ITER,
                                 weights=loss_weights(plan.cfg))
    log(f"Fine-tuning starts from an L-BFGS head on {plan.backbone.parts[0]}'s {C0} features (L2 {l2:g})")
    return head, {"features": C0, "l2": l2}


def final_layer_on_fine_tuned(plan: Plan, data: Data, tuned: Head, train_info: dict, log) -> tuple[Head, Head]:
    """After fine-tuning: the head that fine-tuning trained (with dropout, mixup and label smoothing,
    on distorted views, on the tuned network's features alone), an L-BFGS head on the fine-tuned
    features of the training photos' centre views beside the frozen networks' (L2 chosen on
    validation), and their weighted sums (BLEND_WEIGHTS of the fine-tuned one's calibrated
    logits); the lowest calibrated validation cross entropy is kept. The L-BFGS head is then
    refitted on train + validation, as without --fine-tune (in a sum as well).
    Returns (the final head, the selection head that scores validation)."""
    from retrain.calibrate import fit_temperature, nll

    cfg = plan.cfg
    tr, va, _ = data.split
    if plan.optimizer != "lbfgs" or not len(va):
        return tuned, tuned
    t0 = time.perf_counter()
    k, weights = len(data.labels), loss_weights(cfg)
    max_iter = cfg.how_many_training_steps or LBFGS_MAX_ITER
    lbfgs, l2, _, grid = train_lbfgs(data.X[tr], data.y[tr], data.X[va], data.y[va], k, l2=cfg.l2,
                                     max_iter=max_iter, weights=weights)
    yv = data.y[va]

    def on_validation(h: Head) -> dict:
        z = h.logits(data.X[va]).astype(np.float64)
        T = fit_temperature(z, yv)
        return {"validation_accuracy": float((z.argmax(1) == yv).mean()),
                "validation_calibrated_cross_entropy": nll(z, yv, T), "temperature": T}

    scores = {"fine-tuned": on_validation(tuned), "lbfgs": on_validation(lbfgs) | {"l2": l2, "grid": grid}}
    T_ft, T_lb = scores["fine-tuned"]["temperature"], scores["lbfgs"]["temperature"]

    def blend(a: float, h_lbfgs: Head) -> Head:  # a of the fine-tuned head's calibrated logits
        return weighted_sum([(a / T_ft, tuned), ((1 - a) / T_lb, h_lbfgs)])

    for a in BLEND_WEIGHTS:
        scores[f"blend {a:g}"] = on_validation(blend(a, lbfgs)) | {"fine_tuned_weight": a}
    ce = {name: s["validation_calibrated_cross_entropy"] for name, s in scores.items()}
    chosen = min(ce, key=lambda name: (ce[name], name != "fine-tuned"))  # a tie keeps the simplest
    train_info["fine_tune"]["final_layer"] = {"chosen": chosen, **scores}
    a = scores[chosen].get("fine_tuned_weight", 0.0)
    what = {"fine-tuned": "the fine-tuned one", "lbfgs": "L-BFGS on the fine-tuned features"}.get(
        chosen, f"the calibrated logits of the fine-tuned one x {a:g} + L-BFGS's x {1 - a:g}")
    log(f"Final layer after fine-tuning: {what} (calibrated validation cross entropy {ce[chosen]:.4f}; "
        f"fine-tuned {ce['fine-tuned']:.4f}, L-BFGS {ce['lbfgs']:.4f} at L2 {l2:g})")
    if chosen == "fine-tuned":
        return tuned, tuned
    idx = np.concatenate([tr, va])
    final = train_lbfgs(data.X[idx], data.y[idx], data.X[:0], data.y[:0], k, l2=l2, max_iter=max_iter,
                        weights=weights)[0]
    train_info["refit"] = {"on": "train + validation", "n": int(len(idx)), "l2": l2,
                           "features": "fine-tuned", "seconds": round(time.perf_counter() - t0, 3)}
    log(f"Final layer refitted on train + validation ({len(idx)} photos, L2 {l2:g})")
    if chosen == "lbfgs":
        return final, lbfgs
    return blend(a, final), blend(a, lbfgs)


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
                           weights=loss_weights(cfg))[0]
    t0 = time.perf_counter()
    idx = np.concatenate([tr, va])
    X, y = data.X[idx], data.y[idx]
    views = None
    if plan.views:
        Xv, yv, views = distorted_views(plan, data, log, idx)
        X, y = np.concatenate([X, Xv]), np.concatenate([y, yv])
    weights = loss_weights(cfg)
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
    weights = loss_weights(cfg)
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


# ------------------------------------------------------------------------------ on the final features

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

    from retrain.backbone_split import fine_tuned_features_onnx
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
