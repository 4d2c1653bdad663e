"""Calibrated confidence: temperature scaling, expected calibration error, an "unknown" threshold.

All three are fitted on held-out predictions only (validation, or out-of-fold predictions
on training + validation), never on the test split.

- Temperature scaling (Guo et al. 2017): one scalar T > 0, probabilities softmax(logits / T),
  T chosen to minimise cross entropy. It never changes which class wins, only how sure the
  model says it is. T is folded into the exported head (W / T, b / T).
- Expected calibration error: predictions binned by confidence (15 equal-width bins); the
  mean |accuracy - confidence| per bin, weighted by the bin's share of predictions.
- Unknown threshold: the lowest top-score threshold whose accepted predictions reach a target
  precision (e.g. 0.95) on held-out data; under it `retrain label` answers "unknown".
numpy and scipy only.
"""

from __future__ import annotations

import numpy as np

from retrain.errors import ConfigError
from retrain.head import softmax

ECE_BINS = 15
T_BOUNDS = (0.05, 20.0)


def nll(logits: np.ndarray, y: np.ndarray, temperature: float = 1.0) -> float:
    p = softmax(np.asarray(logits, np.float64) / temperature)
    return float(-np.log(np.clip(p[np.arange(len(y)), y], 1e-300, None)).mean())


def expected_calibration_error(probs: np.ndarray, y: np.ndarray, bins: int = ECE_BINS) -> float:
    """ECE of probabilities (n, K) against labels (n,), in 0..1."""
    p = np.asarray(probs, np.float64)
    y = np.asarray(y)
    if len(y) == 0:
        return float("nan")
    conf = p.max(1)
    correct = (p.argmax(1) == y).astype(np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        m = which == b
        if m.any():
            ece += m.mean() * abs(correct[m].mean() - conf[m].mean())
    return float(ece)


def fit_temperature(logits: np.ndarray, y: np.ndarray) -> float:
    """The T > 0 minimising cross entropy of softmax(logits / T) on held-out data."""
    from scipy.optimize import minimize_scalar

    logits = np.asarray(logits, np.float64)
    y = np.asarray(y)
    if len(y) < 2:
        return 1.0
    lo, hi = np.log(T_BOUNDS[0]), np.log(T_BOUNDS[1])
    res = minimize_scalar(lambda t: nll(logits, y, float(np.exp(t))), bounds=(lo, hi), method="bounded",
                          options={"xatol": 1e-4})
    t = float(np.exp(res.x))
    # Keep T = 1 unless scaling really helps (guards against noise on tiny validation sets).
    return t if nll(logits, y, t) < nll(logits, y, 1.0) - 1e-9 else 1.0


def unknown_threshold(probs: np.ndarray, y: np.ndarray, target_precision: float) -> dict:
    """Lowest top-score threshold t whose accepted predictions (score >= t) reach the target precision.

    Among the thresholds that reach it, the one accepting the most predictions (highest coverage).
    Returns {threshold, precision, coverage, n} measured on (probs, y); threshold None when no
    threshold reaches the target (then nothing would be accepted).
    """
    if not 0 < target_precision < 1:
        raise ConfigError(f"--unknown-precision is a precision between 0 and 1 (e.g. 0.95), got {target_precision}")
    p = np.asarray(probs, np.float64)
    y = np.asarray(y)
    n = len(y)
    if n == 0:
        return {"threshold": None, "precision": None, "coverage": 0.0, "n": 0, "target": target_precision}
    conf = p.max(1)
    correct = (p.argmax(1) == y).astype(np.float64)
    order = np.argsort(-conf, kind="stable")
    cum = np.cumsum(correct[order]) / np.arange(1, n + 1)
    # Accepting the top m predictions is only possible at a cut between distinct scores.
    sorted_conf = conf[order]
    valid = np.r_[sorted_conf[1:] < sorted_conf[:-1], True]
    ok = np.nonzero((cum >= target_precision) & valid)[0]
    if len(ok) == 0:
        return {"threshold": None, "precision": None, "coverage": 0.0, "n": n, "target": target_precision}
    m = int(ok[-1])
    return {"threshold": float(sorted_conf[m]), "precision": float(cum[m]), "coverage": float((m + 1) / n),
            "n": n, "target": target_precision}


def selective_metrics(probs: np.ndarray, y: np.ndarray, threshold: float | None) -> dict:
    """Precision and coverage when predictions under `threshold` are answered "unknown"."""
    p = np.asarray(probs, np.float64)
    y = np.asarray(y)
    if threshold is None or len(y) == 0:
        return {"coverage": 1.0 if len(y) else 0.0,
                "precision": float((p.argmax(1) == y).mean()) if len(y) else None}
    acc = p.max(1) >= threshold
    return {"coverage": float(acc.mean()),
            "precision": float((p[acc].argmax(1) == y[acc]).mean()) if acc.any() else None}


def calibrate_head(head, X, y, tr, va, te, cfg, *, log=None) -> dict:
    """A head's temperature (and optional unknown threshold) fitted on validation (indices `va`
    into X, y); ECE before and after, on validation and test. `cfg`: a FitConfig.

    The test split is only measured here, never used to choose anything.
    """
    from retrain.progress import Log

    log = log or Log.silent()
    out = {"temperature": 1.0, "fitted_on": "validation", "n": int(len(va))}
    zva, zte = head.logits(X[va]), head.logits(X[te])
    if not cfg.no_calibration and len(va) >= 10:
        out["temperature"] = round(fit_temperature(zva, y[va]), 4)
    T = out["temperature"]
    for name, z, yy in (("validation", zva, y[va]), ("test", zte, y[te])):
        if len(yy):
            out[f"ece_{name}_before"] = round(expected_calibration_error(softmax(z), yy), 5)
            out[f"ece_{name}_after"] = round(expected_calibration_error(softmax(z / T), yy), 5)
    if len(va) >= 10 and not cfg.no_calibration:
        log(f"Calibration: temperature {T:.3f}; expected calibration error on validation "
            f"{out['ece_validation_before']:.3f} -> {out['ece_validation_after']:.3f}"
            + (f", on test {out['ece_test_before']:.3f} -> {out['ece_test_after']:.3f}" if len(te) else ""))
    if cfg.unknown_precision is not None:
        u = _unknown_threshold(out, softmax(zva / T), y[va], cfg.unknown_precision, "validation", log)
        if u["threshold"] is not None:
            out["unknown_test"] = selective_metrics(softmax(zte / T), y[te], u["threshold"])
    return out


def _unknown_threshold(out: dict, probs, y, precision: float, where: str, log) -> dict:
    """--unknown-precision: the score threshold on held-out predictions, recorded in `out`."""
    u = unknown_threshold(probs, y, precision)
    out["unknown"] = u
    if u["threshold"] is None:
        log.warn(f"no score threshold reaches precision {precision} on {where}; the model will not answer 'unknown'")
    else:
        out["unknown_threshold"] = round(u["threshold"], 6)
        log(f"Unknown threshold {u['threshold']:.4f}: on {where}, precision {u['precision']:.1%} "
            f"at coverage {u['coverage']:.1%}")
    return u


# Under this many out-of-fold predictions no temperature is fitted (T = 1): measured on 10, 12
# and 30 flowers per class (4 draws each, scored on the flowers' validation split), a
# temperature fitted on 50-60 out-of-fold predictions raised the held-out cross entropy
# (0.553 -> 0.581 at 12 per class), on 150 it lowered it slightly (0.386 -> 0.384). BENCHMARKS.md.
OOF_TEMPERATURE_MIN = 150


def calibrate_out_of_fold(logits, y, parts: dict, cfg, *, log=None) -> dict:
    """Temperature (and optional unknown threshold) from out-of-fold logits (n, K) of k-fold
    cross-validation, one prediction per photo by a head that did not see it; the small-data
    counterpart of calibrate_head. `parts` ("validation"/"test" -> indices) only add the ECE
    of those photos' out-of-fold predictions under the same keys as calibrate_head."""
    from retrain.progress import Log

    log = log or Log.silent()
    z, y = np.asarray(logits, np.float64), np.asarray(y)
    n = len(y)
    out = {"temperature": 1.0, "fitted_on": "out-of-fold predictions (k-fold cross-validation)", "n": int(n)}
    if cfg.no_calibration:
        out["fitted_on"] = "none (--no-calibration)"
    elif n < OOF_TEMPERATURE_MIN:
        out["fitted_on"] = (f"none: {n} out-of-fold predictions, under the {OOF_TEMPERATURE_MIN} from which a "
                            "temperature was measured to help")
    else:
        out["temperature"] = round(fit_temperature(z, y), 4)
    T = out["temperature"]
    for name, idx in (("cross_validation", np.arange(n)), ("validation", parts.get("validation")),
                      ("test", parts.get("test"))):
        if idx is not None and len(idx):
            out[f"ece_{name}_before"] = round(expected_calibration_error(softmax(z[idx]), y[idx]), 5)
            out[f"ece_{name}_after"] = round(expected_calibration_error(softmax(z[idx] / T), y[idx]), 5)
    if T != 1.0:
        log(f"Calibration: temperature {T:.3f} on {n} out-of-fold predictions; expected calibration error "
            f"{out['ece_cross_validation_before']:.3f} -> {out['ece_cross_validation_after']:.3f}")
    if cfg.unknown_precision is not None:
        _unknown_threshold(out, softmax(z / T), y, cfg.unknown_precision, "the out-of-fold predictions", log)
    return out
