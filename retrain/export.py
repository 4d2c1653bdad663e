"""`retrain export RUN --format F --output DIR`: the fast forms of a model, each proven to agree.

Formats:
  onnx       float32, the run's own graph (re-verified, metadata marked)
  onnx-int8  static int8 quantization (ONNX Runtime, QDQ per-channel by default) calibrated on
             a sample of the run's training photos, as the codelab's quantize_graph.py did
  onnx-fp16  float16 weights and activations (inputs/outputs stay float32); for GPUs
DIR is a run folder like RUN (model.onnx, labels.txt, split.json, report.json), so `label`,
`evaluate`, `serve`, `bench` and `compare` take it as they take RUN.

Every export re-scores the run's validation and test photos with the new model and the fp32
model and reports the accuracy change and the largest probability difference; a drop beyond
--tolerance points (default 1) refuses to write the model unless --force. The figures are kept
in the model's metadata ("agreement") and in DIR/report.json ("export").
"""

from __future__ import annotations

import datetime
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from retrain import callable_module
from retrain.errors import ConfigError, DataError, ImageError, ModelError, did_you_mean
from retrain.files import sha256_file
from retrain.progress import Log
from retrain.quantize import convert_fp16, quantize_model_int8
from retrain.run import Run, RunWriter, check_destination

FORMATS = {
    "onnx": "float32 ONNX (the run's model, verified)",
    "onnx-int8": "int8 static quantization calibrated on training photos (CPU: VNNI/AMX; TensorRT reads QDQ)",
    "onnx-fp16": "float16 (for GPUs; inputs and outputs stay float32)",
}
QUANT_FORMATS = ("qdq", "qoperator")
CALIBRATION_METHODS = ("minmax", "percentile", "entropy")
MAX_CALIBRATION = 5000
MAX_VERIFY = 20000


class ExportRejected(ModelError):
    """The exported model disagrees with the fp32 model beyond the tolerance."""


# ------------------------------------------------------------------------------ the run

def read_run(run, image_dir=None) -> tuple[Path, dict, dict, Path]:
    """(run folder, report, split, image root) of a run written by `retrain fit` (or an export)."""
    r = Run(Path(run).expanduser())
    if not r.folder.is_dir():
        raise ModelError(f"{r.folder} is not a run folder (export needs the folder written by "
                         "`retrain fit IMAGE_DIR --output RUN`: its model, split and report)")
    if not r.model.is_file():
        raise ModelError(f"{r.folder} has no {r.model.name}; give a run folder written by `retrain fit`")
    for p in (r.report_path, r.split_path):
        if not p.is_file():
            raise ModelError(f"{r.folder} has no {p.name}, so its validation and test photos are unknown and "
                             "the export cannot be verified; give a run folder written by `retrain fit`")
    report, split = r.report(), r.split()
    return r.folder, report, split, r.image_root(image_dir)


def _sample(items: list, n: int, seed: int) -> list:
    if len(items) <= n:
        return list(items)
    rng = np.random.default_rng(seed)
    return [items[i] for i in sorted(rng.choice(len(items), n, replace=False))]


def load_photos(clf, root: Path, rel_paths: list[str], *, desc: str, quiet: bool = True):
    """Decode photos with the model's preprocessing -> (uint8 (n, H, W, 3), class indices (n,), skipped).

    The class is the photo's top folder (how `retrain fit` names classes); unreadable photos and
    classes the model does not know are skipped and counted.
    """
    from retrain.progress import bar

    keep, y = [], []
    for r in rel_paths:
        c = Path(r).parts[0] if len(Path(r).parts) > 1 else None
        if c in clf.labels:
            keep.append(r)
            y.append(clf.labels.index(c))
    out = np.zeros((len(keep), clf.height, clf.width, 3), np.uint8)
    ok = np.ones(len(keep), bool)

    def one(i):
        try:
            out[i] = clf.load_image(str(root / keep[i]))
        except ImageError:
            ok[i] = False

    with ThreadPoolExecutor(min(4, os.cpu_count() or 1)) as pool, bar(total=len(keep), desc=desc, unit="img",
                                                                     quiet=quiet) as pbar:
        for _ in pool.map(one, range(len(keep))):
            pbar.update(1)
    skipped = len(rel_paths) - int(ok.sum())
    return out[ok], np.asarray(y, np.int64)[ok], skipped


def predict_all(clf, X: np.ndarray, *, batch_size: int = 32, desc: str = "Scoring", quiet: bool = True):
    """Probabilities (n, K) for uint8 images (n, H, W, 3), in batches."""
    from retrain.progress import bar

    k = len(clf.labels)
    P = np.zeros((len(X), k), np.float32)
    with bar(total=len(X), desc=desc, unit="img", quiet=quiet) as pbar:
        for i in range(0, len(X), batch_size):
            P[i:i + batch_size] = clf.predict(X[i:i + batch_size])
            pbar.update(len(X[i:i + batch_size]))
    return P


def agreement(P_ref: np.ndarray, P: np.ndarray, y: np.ndarray) -> dict:
    """How far an exported model's answers are from the fp32 model's, on labelled photos."""
    n = int(len(y))
    if n == 0:
        return {"n": 0}
    acc_ref = float((P_ref.argmax(1) == y).mean())
    acc = float((P.argmax(1) == y).mean())
    d = np.abs(P.astype(np.float64) - P_ref)
    return {"n": n, "accuracy_fp32": round(acc_ref, 6), "accuracy": round(acc, 6),
            "change_points": round((acc - acc_ref) * 100, 4),
            "top1_agreement": round(float((P.argmax(1) == P_ref.argmax(1)).mean()), 6),
            "max_prob_diff": float(f"{d.max():.6g}"), "mean_prob_diff": float(f"{d.mean():.6g}")}


def _set_meta(path: Path, meta: dict) -> None:
    import onnx

    from retrain.files import save_onnx_atomic
    from retrain.model import set_metadata

    m = onnx.load(str(path))
    set_metadata(m, meta)
    save_onnx_atomic(m, path)


# --------------------------------------------------------------------------------- export

def export(run, fmt: str = "onnx", output=None, *, tolerance: float = 1.0, max_prob_diff: float | None = None,
           force: bool = False, calibration_images: int = 200, quant_format: str = "qdq",
           per_channel: bool = True, calibration_method: str = "minmax", provider: str = "auto",
           image_dir=None, max_verify_images: int = 5000, seed: int = 0, quiet: bool = True, log=None) -> dict:
    """Write `fmt` of RUN's model as a run folder at `output`, verified on RUN's validation+test photos.

    Returns the export record (also in output/report.json["export"]). Raises ExportRejected when
    accuracy drops more than `tolerance` points (or a probability moves more than `max_prob_diff`)
    and `force` is off; nothing is written then.

        >>> retrain.export("runs/flowers", "onnx-int8", "runs/flowers-int8")["verified_on"]["all"]
    """
    from retrain.classifier import Classifier

    log = log or Log.silent()
    fmt = check_export_args(fmt, quant_format, calibration_method, calibration_images, max_verify_images,
                            tolerance, max_prob_diff)
    run, report, split, root = read_run(run, image_dir)
    out, src_meta = check_export_target(run, root, fmt, output)
    src = Run(run).model
    ref = Classifier(src, provider=provider)
    photos = verification_photos(ref, split["files"], root, max_verify_images, seed, quiet=quiet, log=log)
    P_ref = predict_all(ref, photos.X, desc="Scoring fp32", quiet=quiet)
    with tempfile.TemporaryDirectory(prefix="retrain-export-", dir=str(out.parent) if out.parent.is_dir() else None) as tmpd:
        cand = Path(tmpd) / "model.onnx"
        extra = convert(src, cand, fmt, ref, split["files"], root, calibration_images=calibration_images,
                        quant_format=quant_format, per_channel=per_channel, calibration_method=calibration_method,
                        seed=seed, quiet=quiet, log=log)
        P = predict_all(Classifier(cand, provider=provider), photos.X, desc=f"Scoring {fmt}", quiet=quiet)
        agree = photos.agreement(P_ref, P)
        problems = judge(agree["all"], fmt, tolerance=tolerance, max_prob_diff=max_prob_diff, force=force)
        now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        record = {"format": fmt, "description": FORMATS[fmt], "source_run": str(run.resolve()),
                  "source_sha256": sha256_file(src), "provider": provider, "verified_on": agree,
                  "tolerance_points": tolerance, "max_prob_diff_allowed": max_prob_diff,
                  "within_tolerance": not problems, "forced": bool(problems and force),
                  "photos_skipped": photos.skipped, "exported": now, **extra}
        _set_meta(cand, exported_metadata(src_meta, fmt, agree, record, run, extra))
        record["size_bytes"] = cand.stat().st_size
        record["source_size_bytes"] = src.stat().st_size
        _write_run(out, cand, run, exported_report(report, out, record, photos, P, ref.labels))
    _index_export(run, fmt, out, now, log)
    record["output"] = str(out)
    return record


def check_export_args(fmt, quant_format, calibration_method, calibration_images, max_verify_images,
                      tolerance, max_prob_diff) -> str:
    """The format, lower case, after every setting is checked (ConfigError otherwise)."""
    fmt = (fmt or "onnx").lower()
    if fmt not in FORMATS:
        raise ConfigError(f"unknown format '{fmt}'; choose one of {', '.join(FORMATS)}.{did_you_mean(fmt, FORMATS)}")
    if quant_format not in QUANT_FORMATS:
        raise ConfigError(f"--quant-format must be one of {', '.join(QUANT_FORMATS)}, got '{quant_format}'."
                          f"{did_you_mean(quant_format, QUANT_FORMATS)}")
    if calibration_method not in CALIBRATION_METHODS:
        raise ConfigError(f"--calibration-method must be one of {', '.join(CALIBRATION_METHODS)}, got "
                          f"'{calibration_method}'.{did_you_mean(calibration_method, CALIBRATION_METHODS)}")
    if not 1 <= calibration_images <= MAX_CALIBRATION:
        raise ConfigError(f"--calibration-images must be between 1 and {MAX_CALIBRATION}, got {calibration_images}")
    if not 1 <= max_verify_images <= MAX_VERIFY:
        raise ConfigError(f"--max-verify-images must be between 1 and {MAX_VERIFY}, got {max_verify_images}")
    if tolerance < 0 or (max_prob_diff is not None and max_prob_diff < 0):
        raise ConfigError("--tolerance and --max-prob-diff must be >= 0")
    return fmt


def check_export_target(run: Path, root: Path, fmt: str, output) -> tuple[Path, dict]:
    """(the folder to write, the source model's metadata), or a ConfigError saying why not."""
    from retrain.model import read_metadata

    out = Path(output).expanduser() if output else run.parent / f"{run.name}-{fmt}"
    if out.resolve() == run.resolve():
        raise ConfigError(f"--output {out} is the run itself; give another folder for the {fmt} form")
    out = check_destination(out, image_dir=root)  # an earlier export there is replaced; nothing else
    src_meta = read_metadata(Run(run).model)
    if src_meta.get("format", "onnx") != "onnx":
        raise ConfigError(f"{run} holds an {src_meta['format']} model; export from the float32 run it came from "
                          f"({src_meta.get('exported_from', {}).get('run', 'its source run')})")
    if src_meta.get("backbone_precision", "fp32") != "fp32" and fmt != "onnx":
        raise ConfigError(f"{run} was trained on {src_meta['backbone_precision']} bottlenecks: its model is "
                          f"already quantized; for {fmt}, train with --bottleneck-precision fp32 "
                          "(or export it as onnx)")
    return out, src_meta


@dataclass
class Photos:
    """The run's validation and test photos the export is verified on."""

    X: np.ndarray  # uint8 (n, H, W, 3)
    y: np.ndarray  # (n,)
    is_val: np.ndarray  # (n,) bool: validation (else test)
    skipped: int

    def agreement(self, P_ref, P) -> dict:
        v = self.is_val
        return {"validation": agreement(P_ref[v], P[v], self.y[v]), "test": agreement(P_ref[~v], P[~v], self.y[~v]),
                "all": agreement(P_ref, P, self.y)}


def verification_photos(ref, files: dict, root: Path, max_images: int, seed: int, *, quiet, log) -> Photos:
    half = max_images // 2
    parts = {part: load_photos(ref, root, _sample(list(files.get(part, [])), n, seed),
                               desc=f"Reading {part} photos", quiet=quiet)
             for part, n in (("validation", half), ("test", max_images - half))}
    X = np.concatenate([parts["validation"][0], parts["test"][0]])
    if len(X) == 0:
        raise DataError(f"none of the run's validation/test photos could be read under {root}; "
                        "pass --image-dir DIR where the run's class folders are")
    y = np.concatenate([parts["validation"][1], parts["test"][1]])
    skipped = parts["validation"][2] + parts["test"][2]
    is_val = np.arange(len(y)) < len(parts["validation"][1])
    log(f"Verifying on {int(is_val.sum())} validation + {int((~is_val).sum())} test photos"
        + (f" ({skipped} unreadable or of unknown classes, skipped)" if skipped else ""))
    return Photos(X, y, is_val, skipped)


def convert(src: Path, cand: Path, fmt: str, ref, files: dict, root: Path, *, calibration_images, quant_format,
            per_channel, calibration_method, seed, quiet, log) -> dict:
    """Write the `fmt` form of `src` to `cand`. Returns what to record about the conversion."""
    if fmt == "onnx":
        shutil.copyfile(src, cand)
        return {}
    if fmt == "onnx-fp16":
        return {"precision": convert_fp16(src, cand)}
    train_rel = _sample(list(files.get("train", [])), calibration_images, seed)
    C, _, _ = load_photos(ref, root, train_rel, desc="Reading calibration photos", quiet=quiet)
    if len(C) == 0:
        raise DataError(f"no training photos could be read under {root} for int8 calibration")
    log(f"Quantizing to int8 ({quant_format.upper()}, per-{'channel' if per_channel else 'tensor'}, "
        f"{calibration_method} calibration on {len(C)} training photos)")
    return {"quantization": quantize_model_int8(src, cand, C, mean=ref.mean, std=ref.std, quant_format=quant_format,
                                                per_channel=per_channel, method=calibration_method,
                                                quiet=quiet, log=log)}


def judge(a: dict, fmt: str, *, tolerance: float, max_prob_diff, force: bool) -> list[str]:
    """What is outside the tolerance; ExportRejected when anything is and `force` is off."""
    problems = []
    drop = -a["change_points"]
    if drop > tolerance:
        problems.append(f"loses {drop:.2f} points of accuracy on the run's validation+test photos "
                        f"({a['accuracy_fp32']:.2%} -> {a['accuracy']:.2%}, n={a['n']}), over the tolerance "
                        f"of {tolerance:g}")
    if max_prob_diff is not None and a["max_prob_diff"] > max_prob_diff:
        problems.append(f"moves a probability by {a['max_prob_diff']:.4f}, over --max-prob-diff {max_prob_diff:g}")
    if problems and not force:
        raise ExportRejected(f"the {fmt} export {' and '.join(problems)}; nothing was written "
                             f"(largest probability difference {a['max_prob_diff']:.4f}, top-1 agreement "
                             f"{a['top1_agreement']:.1%}). Use --force to write it anyway"
                             + (", or more --calibration-images / --calibration-method percentile" if fmt == "onnx-int8" else ""))
    return problems


def exported_metadata(src_meta: dict, fmt: str, agree: dict, record: dict, run: Path, extra: dict) -> dict:
    """The source model's metadata, marked with the format, the verified accuracies and the source."""
    metrics = dict(src_meta.get("metrics") or {})
    for part in ("validation", "test"):
        if agree[part].get("n"):
            metrics[part] = {**(metrics.get(part) or {}), "accuracy": agree[part]["accuracy"], "n": agree[part]["n"]}
    return {**src_meta, "format": fmt, "metrics": metrics, "exported": record["exported"],
            "exported_from": {"run": str(run.resolve()), "sha256": record["source_sha256"]},
            "agreement": {k: {kk: v[kk] for kk in ("n", "accuracy_fp32", "accuracy", "change_points",
                                                     "max_prob_diff") if kk in v} for k, v in agree.items()},
            **extra}


def exported_report(report: dict, out: Path, record: dict, photos: Photos, P, labels) -> dict:
    from retrain.evaluate import compute_metrics

    new = {**report, "output": str(out), "export": record, "metrics": dict(report.get("metrics") or {})}
    for part, mask in (("validation", photos.is_val), ("test", ~photos.is_val)):
        if mask.any():
            new["metrics"][part] = compute_metrics(photos.y[mask], P[mask], labels)
    return new


def _write_run(out: Path, model: Path, run: Path, report: dict) -> None:
    """DIR as a run folder, swapped in whole: a crash never leaves half an export."""
    src = Run(run)
    with RunWriter(out, kind="export") as tmp:
        dst = Run(tmp)
        shutil.copyfile(model, dst.model)
        if src.labels_path.is_file():
            shutil.copyfile(src.labels_path, dst.labels_path)
        shutil.copyfile(src.split_path, dst.split_path)
        dst.write_report(report)


def _index_export(run: Path, fmt: str, out: Path, when: str, log) -> None:
    """Note the export in RUN/exports.json so `retrain bench RUN` finds every form (best effort)."""
    try:
        Run(run).note_export(fmt, out, when)
    except OSError as e:
        log(f"could not note the export in {run} ({e}); `retrain bench` will not list it by itself")


# ------------------------------------------------------------------------------------ CLI

def format_record(rec: dict) -> str:
    mb = lambda b: f"{b / 1e6:.1f} MB"  # noqa: E731
    lines = [f"retrain export: {rec['format']} -> {rec['output']} ({mb(rec['size_bytes'])}; fp32 "
             f"{mb(rec['source_size_bytes'])})"]
    lines.append(f"  {'photos':<11} {'n':>5}  {'fp32':>7}  {rec['format']:>9}  {'change':>8}  "
                 f"{'top-1 agree':>11}  {'max prob diff':>13}")
    for part in ("validation", "test", "all"):
        a = rec["verified_on"][part]
        if not a.get("n"):
            continue
        lines.append(f"  {part:<11} {a['n']:>5}  {a['accuracy_fp32']:>7.2%}  {a['accuracy']:>9.2%}  "
                     f"{a['change_points']:>+7.2f}pt  {a['top1_agreement']:>11.1%}  {a['max_prob_diff']:>13.4f}")
    if rec.get("forced"):
        lines.append("  WARNING: outside the tolerance; written because of --force")
    return "\n".join(lines)


def add_arguments(p) -> None:
    from retrain.config import bounded
    from retrain.runtime import PROVIDER_CHOICES

    p.add_argument("run", help="run folder written by retrain fit")
    p.add_argument("--format", "-f", default="onnx", metavar="F",
                   help=f"{', '.join(FORMATS)} (default onnx)")
    p.add_argument("--output", "-o", metavar="DIR", help="run folder to write (default: RUN-FORMAT next to RUN)")
    p.add_argument("--tolerance", type=bounded(float, 0, 100, "--tolerance"), default=1.0,
                   help="most accuracy points the export may lose on validation+test photos (default 1)")
    p.add_argument("--max-prob-diff", type=bounded(float, 0, 1, "--max-prob-diff"), default=None,
                   help="also refuse if any probability moves more than this (default: no limit)")
    p.add_argument("--force", action="store_true", help="write the model even if it is outside the tolerance")
    p.add_argument("--calibration-images", type=int, default=200,
                   help="training photos used to calibrate int8 (default 200)")
    p.add_argument("--calibration-method", default="minmax", help=f"{', '.join(CALIBRATION_METHODS)} (default minmax)")
    p.add_argument("--quant-format", default="qdq", help="qdq (default; portable, TensorRT reads it) or qoperator")
    p.add_argument("--per-tensor", action="store_true", help="int8 weights per tensor (default: per channel)")
    p.add_argument("--provider", default="auto", help=f"where to verify: {', '.join(PROVIDER_CHOICES)} (default auto)")
    p.add_argument("--image-dir", help="the run's photos, if they moved (default: image_dir in report.json)")
    p.add_argument("--max-verify-images", type=int, default=5000,
                   help="most validation+test photos re-scored (default 5000)")
    p.add_argument("--json", action="store_true", help="print the export record as JSON")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def main(args) -> int:
    from retrain.progress import print_json

    from retrain.progress import Log

    log = Log(args.quiet or args.json)
    rec = export(args.run, args.format, args.output, tolerance=args.tolerance, max_prob_diff=args.max_prob_diff,
                 force=args.force, calibration_images=args.calibration_images, quant_format=args.quant_format,
                 per_channel=not args.per_tensor, calibration_method=args.calibration_method,
                 provider=args.provider, image_dir=args.image_dir, max_verify_images=args.max_verify_images,
                 quiet=args.quiet or args.json, log=log)
    if args.json:
        print_json(rec)
    else:
        print(format_record(rec))
    return 0


callable_module(__name__, export)  # retrain.export(...) is export(...)
