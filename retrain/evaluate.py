"""`retrain evaluate MODEL DIR`: accuracy and friends on labelled photos the model never saw.

`compute_metrics` is also what `fit` uses for its train/validation/test figures, so the two
can never disagree on what "accuracy" means.
"""

from __future__ import annotations

import sys
from pathlib import Path

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


def format_open_set(o: dict) -> str:
    """The open-set figures in words."""
    def pct(v):
        return "n/a" if v is None else f"{v * 100:.1f}%"

    ins = o["inside"]
    lines = [f"answered unknown: {pct(ins['rejected'])} of these photos (open-set accuracy {pct(ins['open_set_accuracy'])}"
             f"; score: {o['score']})"]
    if "outside" in o:
        out = o["outside"]
        auroc = "n/a" if o["auroc"] is None else f"{o['auroc']:.3f}"
        lines.append(f"outside photos ({out['dir']}, n={out['n']}): {pct(out['rejected'])} answered unknown; "
                     f"AUROC {auroc}; open-set accuracy over both {pct(o['open_set_accuracy'])}")
        for sk in out["skipped"]:
            lines.append(f"  skipped {sk['path']}: {sk['reason']}")
    return "\n".join(lines)


def evaluate(model, image_dir, *, provider: str = "auto", batch_size: int = 8, tta: bool | None = None,
             quiet: bool = False, unknown_dir=None, **overrides) -> dict:
    """Accuracy, per-class precision/recall/F1, confusion and misclassified photos of a model (run
    folder or .onnx) on a folder of class subfolders; `accuracy` is closed-set (the best class,
    whatever the novelty). "open_set": how many of these photos it answers "unknown" and, with
    `unknown_dir` (a folder of photos of none of the classes), how many of those, and the AUROC
    of the novelty between the two (see open_set_metrics).

        >>> m = retrain.evaluate("runs/flowers", "more_flower_photos", unknown_dir="not_flowers")
        >>> m["accuracy"], m["per_class"]["roses"]["recall"], m["open_set"]["outside"]["rejected"]
    """
    from retrain.classifier import Classifier
    from retrain.scan import scan

    clf = Classifier(model, provider=provider, **overrides)
    s = scan(image_dir, quiet=quiet, allowed_classes=clf.labels)
    paths = [it.path for it in s.items]
    tta = clf.tta_default if tta is None else tta  # None: as recorded in the model (fit --tta)
    probs, novelty, errors = clf.score_files(paths, batch_size=batch_size, quiet=quiet, tta=tta)
    ok = [i for i in range(len(paths)) if i not in errors]
    y = np.array([clf.labels.index(s.items[i].label) for i in ok], dtype=np.int64)
    m = compute_metrics(y, probs[ok], clf.labels, [paths[i] for i in ok])
    m["model"] = str(clf.path)
    m["image_dir"] = str(s.root)
    m["skipped"] = s.skipped + [{"path": paths[i], "reason": r} for i, r in errors.items()]
    m["tta"] = bool(tta)
    outside = None
    if unknown_dir is not None:
        from retrain.novelty import list_photos

        opaths = list_photos(unknown_dir, flag="--unknown-dir")
        oprobs, onov, oerr = clf.score_files(opaths, batch_size=batch_size, quiet=quiet, tta=tta)
        keep = [i for i in range(len(opaths)) if i not in oerr]
        outside = {"dir": str(unknown_dir), "probs": oprobs[keep], "novelty": None if onov is None else onov[keep],
                   "skipped": [{"path": opaths[i], "reason": r} for i, r in oerr.items()]}
    m["open_set"] = open_set_metrics(clf, y, probs[ok], None if novelty is None else novelty[ok], outside)
    return m


def open_set_metrics(clf, y, probs, novelty, outside=None) -> dict:
    """What the model answers "unknown" (Classifier.is_unknown) on in-distribution photos (y, probs,
    novelty) and on outside photos (dict: dir, probs, novelty, skipped): the shares rejected,
    the open-set accuracy (inside: the right class and not unknown; outside: unknown), and the
    AUROC of the score (the novelty; for a model without one, 1 - the top score)."""
    from retrain.novelty import auroc, histogram

    def score(p, nov):
        return np.asarray(nov, np.float64) if nov is not None else 1.0 - np.asarray(p, np.float64).max(1)

    def unknown(p, nov):
        return np.array([clf.is_unknown(p[i], None if nov is None else float(nov[i])) for i in range(len(p))], bool)

    s_in, u_in = score(probs, novelty), unknown(probs, novelty)
    right = (np.asarray(probs).argmax(1) == y) & ~u_in if len(y) else np.zeros(0, bool)
    out = {"score": "novelty" if novelty is not None else "1 - top score (this model has no novelty output; "
                                                          "retrain it to get one)",
           "novelty_threshold": clf.novelty_threshold, "unknown_threshold": clf.unknown_threshold,
           "inside": {"n": int(len(y)), "rejected": float(u_in.mean()) if len(y) else None,
                      "open_set_accuracy": float(right.mean()) if len(y) else None}}
    if outside is not None:
        s_out, u_out = score(outside["probs"], outside["novelty"]), unknown(outside["probs"], outside["novelty"])
        n = len(s_out)
        out["outside"] = {"dir": outside["dir"], "n": int(n), "rejected": float(u_out.mean()) if n else None,
                          "skipped": outside["skipped"]}
        out["auroc"] = auroc(s_in, s_out)
        total = len(y) + n
        out["open_set_accuracy"] = float((right.sum() + u_out.sum()) / total) if total else None
        out["histogram"] = histogram(s_in, s_out, inside_label="these photos (in-distribution)",
                                     outside_label=f"outside photos ({Path(outside['dir']).name})",
                                     threshold=clf.novelty_threshold if novelty is not None else None)
    return out


def add_arguments(p) -> None:
    from retrain.classifier import add_inference_arguments

    p.add_argument("model", help="run folder (or model.onnx) written by retrain fit")
    p.add_argument("image_dir", help="folder with one subfolder of photos per class")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    add_inference_arguments(p)
    p.add_argument("--html", metavar="FILE", help="also write an HTML report of the evaluation")
    p.add_argument("--unknown-dir", "--unknown_dir", metavar="DIR",
                   help="a folder of photos that belong to none of the classes: how many are answered unknown, "
                        "and the AUROC of the novelty score against the labelled photos")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def main(args) -> int:
    from retrain.progress import print_json

    from retrain.errors import ConfigError
    from retrain.progress import Log

    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {args.batch_size}")
    log = Log(args.quiet or args.json)
    m = evaluate(args.model, args.image_dir, provider=args.provider, batch_size=args.batch_size,
                 tta=args.tta, quiet=args.quiet or args.json, unknown_dir=args.unknown_dir)
    if args.html:
        from retrain.report import write_eval_html

        write_eval_html(m, args.html)
        log(f"wrote {args.html}")
    if args.json:
        print_json(m)
        return 0
    print(format_metrics(m, f"{m['model']} on {m['image_dir']}"))
    if m.get("open_set"):
        print(format_open_set(m["open_set"]))
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
