"""`retrain fit`'s last stages: the photos the written model is checked on, the run folder
(model.onnx verified against the head, labels, split, report.json and report.html; the files
themselves are retrain.run's and retrain.model's) and the codelab's --output_graph /
--output_labels copies. retrain.fit runs the stages in order.
"""

from __future__ import annotations

import time

import numpy as np

from retrain.config import FitConfig
from retrain.fit_data import Data, Plan, checkpoint_path
from retrain.head import Head


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


def check_features(data: Data, idx, fp32_frozen, ft):
    """The features the written model should compute for the check photos: the bottlenecks
    (data.X), or where those are bf16, their fp32 values, except for a fine-tuned network's
    columns, which are data.X's (its fine-tuned features) either way."""
    if fp32_frozen is None:
        return data.X[idx]
    if ft is None:
        return fp32_frozen
    feats = fp32_frozen.copy()
    C0 = ft.features.shape[1]
    feats[:, :C0] = data.X[idx, :C0]
    return feats


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
        feats = check_features(data, check_idx, check_feats, ft)
        expected = head.probs(feats, temperature)
        expected = (expected,) if novelty is None else (expected, novelty.score(feats))  # the novelty output too
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


# ------------------------------------------------------------------------------ the report

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
