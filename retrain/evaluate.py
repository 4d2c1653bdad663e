"""`retrain evaluate MODEL DIR`: accuracy and friends on labelled photos the model never saw.

`compute_metrics` is also what `fit` uses for its train/validation/test figures, so the two
can never disagree on what "accuracy" means.
"""

from __future__ import annotations

import sys

import numpy as np

from retrain import callable_module


def compute_metrics(y_true, probs, labels: list[str], paths=None) -> dict:
    """Metrics of probabilities (n, K) against integer labels (n,). JSON-ready."""
    y = np.asarray(y_true, dtype=np.int64)
    p = np.asarray(probs, dtype=np.float64)
    k = len(labels)
    n = int(len(y))
    if n == 0:
        return {"n": 0, "accuracy": None, "cross_entropy": None, "per_class": {}, "confusion": [],
                "labels": list(labels), "misclassified": []}
    pred = p.argmax(1)
    conf = np.zeros((k, k), dtype=np.int64)
    np.add.at(conf, (y, pred), 1)
    ce = float(-np.log(np.clip(p[np.arange(n), y], 1e-12, 1.0)).mean())
    per_class = {}
    for i, name in enumerate(labels):
        tp = int(conf[i, i])
        support = int(conf[i].sum())
        predicted = int(conf[:, i].sum())
        prec = tp / predicted if predicted else 0.0
        rec = tp / support if support else 0.0
        f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
        per_class[name] = {"precision": round(prec, 4), "recall": round(rec, 4), "f1": round(f1, 4),
                           "support": support}
    top = np.argsort(-p, axis=1)[:, : min(5, k)]
    top5 = float((top == y[:, None]).any(1).mean())
    wrong = np.nonzero(pred != y)[0]
    mis = [{"path": str(paths[i]) if paths is not None else int(i), "true": labels[y[i]],
            "predicted": labels[pred[i]], "confidence": round(float(p[i, pred[i]]), 4)}
           for i in wrong]
    present = [c for c in labels if per_class[c]["support"]]
    return {
        "n": n,
        "accuracy": round(float((pred == y).mean()), 6),
        "top5_accuracy": round(top5, 6),
        "cross_entropy": round(ce, 6),
        "macro_f1": round(float(np.mean([per_class[c]["f1"] for c in present])), 6) if present else None,
        "per_class": per_class,
        "labels": list(labels),
        "confusion": conf.tolist(),
        "misclassified": sorted(mis, key=lambda m: -m["confidence"]),
    }


def format_metrics(m: dict, title: str = "") -> str:
    """A table a person can read: accuracy, per-class P/R/F1, confusion matrix."""
    lines = []
    if title:
        lines.append(title)
    lines.append(f"accuracy {m['accuracy'] * 100:.2f}%  (n={m['n']}, cross entropy {m['cross_entropy']:.4f},"
                 f" top-5 {m['top5_accuracy'] * 100:.1f}%)")
    labels = m["labels"]
    w = max(8, max(len(c) for c in labels))
    lines.append(f"{'class':<{w}}  precision  recall     f1  support")
    for c in labels:
        r = m["per_class"][c]
        lines.append(f"{c:<{w}}  {r['precision']:9.3f}  {r['recall']:6.3f}  {r['f1']:5.3f}  {r['support']:7d}")
    lines.append("confusion (rows: true, columns: predicted)")
    cw = max(5, max(len(c[:10]) for c in labels))
    lines.append(" " * (w + 2) + " ".join(f"{c[:10]:>{cw}}" for c in labels))
    for c, row in zip(labels, m["confusion"]):
        lines.append(f"{c:<{w}}  " + " ".join(f"{v:>{cw}d}" for v in row))
    return "\n".join(lines)


def evaluate(model, image_dir, *, provider: str = "auto", batch_size: int = 8, tta: bool | None = None,
             quiet: bool = False, **overrides) -> dict:
    """Accuracy, per-class precision/recall/F1, confusion and misclassified photos of a model (run
    folder or .onnx) on a folder of class subfolders.

        >>> m = retrain.evaluate("runs/flowers", "more_flower_photos")
        >>> m["accuracy"], m["per_class"]["roses"]["recall"]
    """
    from retrain.classifier import Classifier
    from retrain.scan import scan

    clf = Classifier(model, provider=provider, **overrides)
    s = scan(image_dir, quiet=quiet, allowed_classes=clf.labels)
    paths = [it.path for it in s.items]
    tta = clf.tta_default if tta is None else tta  # None: as recorded in the model (fit --tta)
    probs, errors = clf.classify_files(paths, batch_size=batch_size, quiet=quiet, tta=tta)
    ok = [i for i in range(len(paths)) if i not in errors]
    y = np.array([clf.labels.index(s.items[i].label) for i in ok], dtype=np.int64)
    m = compute_metrics(y, probs[ok], clf.labels, [paths[i] for i in ok])
    m["model"] = str(clf.path)
    m["image_dir"] = str(s.root)
    m["skipped"] = s.skipped + [{"path": paths[i], "reason": r} for i, r in errors.items()]
    m["tta"] = bool(tta)
    return m


def add_arguments(p) -> None:
    from retrain.classifier import add_inference_arguments

    p.add_argument("model", help="run folder (or model.onnx) written by retrain fit")
    p.add_argument("image_dir", help="folder with one subfolder of photos per class")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    add_inference_arguments(p)
    p.add_argument("--html", metavar="FILE", help="also write an HTML report of the evaluation")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def main(args) -> int:
    from retrain.progress import print_json

    from retrain.errors import ConfigError
    from retrain.progress import Log

    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {args.batch_size}")
    log = Log(args.quiet or args.json)
    m = evaluate(args.model, args.image_dir, provider=args.provider, batch_size=args.batch_size,
                 tta=args.tta, quiet=args.quiet or args.json)
    if args.html:
        from retrain.report import write_eval_html

        write_eval_html(m, args.html)
        log(f"wrote {args.html}")
    if args.json:
        print_json(m)
        return 0
    print(format_metrics(m, f"{m['model']} on {m['image_dir']}"))
    if m["misclassified"]:
        print(f"misclassified ({len(m['misclassified'])}):")
        for r in m["misclassified"][:50]:
            print(f"  {r['path']}: {r['true']} -> {r['predicted']} ({r['confidence']:.3f})")
        if len(m["misclassified"]) > 50:
            print(f"  ... and {len(m['misclassified']) - 50} more (use --json for all)")
    for s in m["skipped"]:
        print(f"skipped {s['path']}: {s['reason']}", file=sys.stderr)
    return 0


callable_module(__name__, evaluate)  # retrain.evaluate(...) is evaluate(...)
