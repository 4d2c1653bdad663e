"""`retrain fit --features STORE`: the final layer trained from a feature store, with no photos.

Up to IN_MEMORY_BYTES of float32 features (about 420,000 rows of 1280 features) the store is
read into memory and `fit` goes on as after its bottleneck stage: full-batch L-BFGS, L2
chosen on validation, refit on train + validation. Beyond it (or with --optimizer stream) the
head is trained by a streamed mini-batch optimiser whose memory does not grow with the store:

  * one pass over the row groups: standardisation statistics of the training rows, class
    counts, the split of each row (the codelab's file-name hash, as for photos), and seeded
    random samples of at most SAMPLE_ROWS rows of each split (kept in memory);
  * STREAM_EPOCHS epochs of Adam over the training rows, row groups in a new random order each
    epoch and rows shuffled inside each, with one head per L2 strength of retrain.head's grid
    trained at once on the same mini-batches (the reading is shared; the heads are tiny);
  * the strength with the lowest cross entropy on the validation sample wins; the temperature,
    the unknown threshold and the reported metrics come from the split samples.

Memory: one row group (ROW_GROUP_ROWS rows) at a time, the samples, and 3 bytes per row (split
and class of each row), whatever the store's size (BENCHMARKS.md: 10M rows).
"""

from __future__ import annotations

import time

import numpy as np

from retrain.errors import ConfigError, DataError
from retrain.scan import ImageItem, ScanResult

IN_MEMORY_BYTES = 2 * 1024**3  # float32 features up to this are trained in memory by L-BFGS
SAMPLE_ROWS = 10_000  # rows kept of each split for choosing, calibrating and scoring
STREAM_EPOCHS = 4
STREAM_BATCH = 1024
STREAM_LR = 2e-3
SPLIT_CODES = {"train": 0, "validation": 1, "test": 2}


class StoreScan(ScanResult):
    """A ScanResult over a store's rows (its root is the store): counts() gives every row's class
    even where only samples of the rows are held (the streamed case)."""

    def __init__(self, root, classes, items, skipped, counts):
        super().__init__(str(root), classes, items, skipped, [], [])
        self._counts = counts

    def counts(self) -> dict[str, int]:
        return dict(self._counts)


def open_store(plan, log):
    """The store of --features, its backbone checked against this installation's: the model's
    backbone must be the one that computed the features."""
    from retrain.architectures import get_backbone
    from retrain.store import FeatureStore

    cfg = plan.cfg
    store = FeatureStore.open(cfg.features, plan.backbone, log=log)
    meta = store.meta
    try:
        bb = get_backbone(meta["backbone"])
    except Exception:  # noqa: BLE001 - an unknown name: ConfigError from get_backbone
        raise DataError(f"the feature store {store.where()} was made by backbone '{meta.get('backbone')}', which "
                        "this retrain does not know: use the retrain version that made it") from None
    if bb.fingerprint(meta["precision"]) != meta.get("fingerprint"):
        raise DataError(f"the feature store {store.where()} was made by another build of {bb.name} "
                        f"(fingerprint {meta.get('fingerprint')}, here {bb.fingerprint(meta['precision'])}): its "
                        "features do not match this backbone; run retrain embed again into a new --out")
    plan.backbone, plan.precision = bb, meta["precision"]
    return store


def load_store(plan, log) -> dict:
    """Data's fields (retrain.fit_data.Data) from the store: every row (in memory), or for a store
    beyond IN_MEMORY_BYTES (or --optimizer stream) the split samples plus `stream` for the
    streamed optimiser."""
    from retrain.split import split_parts

    cfg = plan.cfg
    t0 = time.perf_counter()
    store = open_store(plan, log)
    n = len(store)
    if not n:
        raise DataError(f"the feature store {store.where()} has no rows: fill it with retrain embed DIR --out "
                        f"{cfg.features}")
    fits = n * store.dim * 4 <= IN_MEMORY_BYTES
    if cfg.optimizer == "stream" or (cfg.optimizer == "auto" and not fits):
        plan.optimizer = "stream"
        log(f"Feature store {store.where()}: {n} rows ({n * store.dim * 4 / 1e9:.1f} GB as float32): "
            f"the streamed optimiser (L-BFGS in memory up to {IN_MEMORY_BYTES / 1e9:.1f} GB)")
        return streamed_data(plan, store, log, t0)
    if not fits:
        log.warn(f"--optimizer {cfg.optimizer} reads all {n} rows of the store into memory "
                 f"({n * store.dim * 4 / 1e9:.1f} GB as float32); --optimizer stream keeps memory bounded")
    log(f"Feature store {store.where()}: {n} rows, read into memory ({n * store.dim * 4 / 1e9:.2f} GB as float32)")
    keys, paths, labels, X, errors = store.read_all()
    ok = [i for i, e in enumerate(errors) if e is None]
    skipped = [{"path": paths[i], "reason": errors[i]} for i, e in enumerate(errors) if e is not None]
    items = [ImageItem(paths[i], labels[i], bytes(keys[i]).hex(), 0) for i in ok]
    classes = sorted({it.label for it in items})
    if len(classes) < 2:
        raise DataError(f"the feature store {store.where()} holds {len(classes)} class: a classifier needs two or more")
    from collections import Counter

    counts = Counter(it.label for it in items)
    y, parts = split_parts(items, classes, cfg, log)
    scan = StoreScan(store.where(), classes, items, skipped, {c: counts.get(c, 0) for c in classes})
    timings = {"scan_s": 0.0, "bottlenecks_s": round(time.perf_counter() - t0, 3)}
    return dict(scan=scan, cache=_where(store), items=items, X=X[ok], y=y, labels=classes, parts=parts, skipped=skipped,
                warnings=[], bottleneck_timing={"cached": len(items), "computed": 0, "store": store.where()},
                timings=timings)


def _where(store):
    """Stands in for Data.cache: the report's cache_dir names the store the features came from."""
    from types import SimpleNamespace

    return SimpleNamespace(folder=store.where())


def _split_codes(paths, val_pct: float, test_pct: float) -> np.ndarray:
    from retrain.split import hash_percentage

    h = np.fromiter((hash_percentage(p) for p in paths), np.float64, len(paths))
    return np.where(h < val_pct, 1, np.where(h < val_pct + test_pct, 2, 0)).astype(np.int8)


class _Sample:
    """Seeded uniform sample of at most `size` rows: the rows with the smallest random priority."""

    def __init__(self, size: int, dim: int):
        self.size, self.prio = size, np.zeros(0)
        self.X = np.zeros((0, dim), np.float32)
        self.y = np.zeros(0, np.int64)
        self.paths: list = []
        self.keys: list = []

    def offer(self, prio, X, y, paths, keys):
        P = np.concatenate([self.prio, prio])
        if len(P) > self.size:
            keep = np.argpartition(P, self.size - 1)[: self.size]
        else:
            keep = np.arange(len(P))
        keep.sort()
        Xa = np.concatenate([self.X, X.astype(np.float32)])
        ya = np.concatenate([self.y, y])
        pa, ka = self.paths + list(paths), self.keys + list(keys)
        self.prio, self.X, self.y = P[keep], Xa[keep], ya[keep]
        self.paths, self.keys = [pa[i] for i in keep], [ka[i] for i in keep]


class _FirstPass:
    """What the first pass over the store gathers, one row group at a time: the class names in the
    order met, each row's split code (-1: no features) and class, sums for the standardisation
    and class counts of the training rows, the split samples, and skipped rows for the report."""

    def __init__(self, dim: int, seed):
        self.dim, self.rng = dim, np.random.default_rng(seed)
        self.names: dict[str, int] = {}
        self.codes: list = []
        self.ys: list = []
        self.s1 = np.zeros(dim)
        self.s2 = np.zeros(dim)
        self.counts = np.zeros(0, np.int64)
        self.samples = {name: _Sample(SAMPLE_ROWS, dim) for name in SPLIT_CODES}
        self.skipped: list = []

    def add(self, t, val_pct: float, test_pct: float) -> None:
        """One row group (a table of key, path, label, features, error)."""
        paths, labels, errs = (t.column(c).to_pylist() for c in ("path", "label", "error"))
        valid = np.array([e is None for e in errs])
        self.skipped += [{"path": paths[i], "reason": errs[i]}
                         for i in np.nonzero(~valid)[0][:max(0, 1000 - len(self.skipped))]]  # the report lists 1000
        y = np.array([self.names.setdefault(lab, len(self.names)) for lab in labels], np.int16)
        sp = _split_codes(paths, val_pct, test_pct)
        sp[~valid] = -1
        self.codes.append(sp)
        self.ys.append(y)
        X = np.zeros((len(t), self.dim), np.float32)
        if valid.any():
            f = t.column("features").combine_chunks()
            X[valid] = f.filter(f.is_valid()).values.to_numpy(zero_copy_only=False).reshape(-1, self.dim)
        tr = sp == 0
        self.s1 += X[tr].sum(0, dtype=np.float64)
        self.s2 += np.square(X[tr], dtype=np.float64).sum(0) if tr.any() else 0
        self.counts = np.bincount(y[tr], minlength=max(len(self.names), len(self.counts))) + np.pad(
            self.counts, (0, max(0, len(self.names) - len(self.counts))))
        keys = t.column("key").to_pylist()
        prio = self.rng.random(len(t))
        for name, c in SPLIT_CODES.items():
            m = np.nonzero(sp == c)[0]
            if len(m):
                self.samples[name].offer(prio[m], X[m], y[m].astype(np.int64), [paths[i] for i in m],
                                         [keys[i] for i in m])


def _first_pass(store, groups, cfg) -> _FirstPass:
    from retrain.progress import bar

    first = _FirstPass(store.dim, cfg.seed)
    with bar(total=sum(g[2] for g in groups), desc="Reading the store", unit="row", quiet=cfg.quiet) as pbar:
        for p, g, rows in groups:
            first.add(store.read_group(p, g, ["key", "path", "label", "features", "error"]),
                      cfg.validation_percentage, cfg.testing_percentage)
            pbar.update(rows)
    return first


def _sample_rows(samples: dict, classes: list, remap: np.ndarray):
    """(items, X, y, parts) of the split samples, classes renumbered in sorted order."""
    items, X, y, parts, start = [], [], [], {}, 0
    for name in SPLIT_CODES:
        sm = samples[name]
        items += [ImageItem(p, classes[remap[c]], bytes(k).hex(), 0) for p, c, k in zip(sm.paths, sm.y, sm.keys)]
        X.append(sm.X)
        y.append(remap[sm.y])
        parts[name] = np.arange(start, start + len(sm.y), dtype=np.int64)
        start += len(sm.y)
    return items, np.concatenate(X), np.concatenate(y), parts


def streamed_data(plan, store, log, t0) -> dict:
    """The first pass over the store (see the module's docstring): Data's fields with the samples."""
    cfg = plan.cfg
    groups = store.row_groups()
    first = _first_pass(store, groups, cfg)
    names, codes, ys = first.names, first.codes, first.ys
    classes = sorted(names)
    if len(classes) < 2:
        raise DataError(f"the feature store {store.where()} holds {len(classes)} class: a classifier needs two or more")
    remap = np.zeros(len(names), np.int64)
    for lab, j in names.items():
        remap[j] = classes.index(lab)
    counts = np.pad(first.counts, (0, len(names) - len(first.counts)))
    n_train = int(counts.sum())
    if n_train < 2 or not len(first.samples["validation"].y):
        raise DataError(f"the feature store {store.where()} has too few rows for a training and a validation "
                        f"split ({n_train} training rows)")
    mu = first.s1 / n_train
    sigma = np.sqrt(np.maximum(first.s2 / n_train - mu * mu, 0)) + 1e-6
    items, X, y, parts = _sample_rows(first.samples, classes, remap)
    all_counts = np.zeros(len(classes), np.int64)
    for c, yy in zip(codes, ys):
        all_counts += np.bincount(remap[yy[c >= 0]], minlength=len(classes))
    split_counts = {name: int(sum((c == code).sum() for c in codes)) for name, code in SPLIT_CODES.items()}
    log(f"Split: {split_counts['train']} train, {split_counts['validation']} validation, {split_counts['test']} test "
        f"(samples of up to {SAMPLE_ROWS} rows each kept to choose, calibrate and score)")
    scan = StoreScan(store.where(), classes, items, first.skipped, dict(zip(classes, all_counts.tolist())))
    train_counts = np.zeros(len(classes), np.int64)
    train_counts[remap] = counts
    stream = {"store": store, "groups": groups, "codes": codes, "labels": [remap[yy].astype(np.int16) for yy in ys],
              "mu": mu, "sigma": sigma, "train_counts": train_counts,
              "split_counts": split_counts}
    return dict(scan=scan, cache=_where(store), items=items, X=X, y=y, labels=classes,
                parts=parts, skipped=first.skipped, warnings=[],
                bottleneck_timing={"cached": int(sum(split_counts.values())), "computed": 0, "store": store.where()},
                timings={"scan_s": 0.0, "bottlenecks_s": round(time.perf_counter() - t0, 3)}, stream=stream)


class _Heads:
    """One softmax head per L2 strength of `grid`, stacked column-wise (k columns each), trained at
    once by Adam on the same mini-batches, the learning rate cosine-decayed over `total` steps."""

    B1, B2, EPS = 0.9, 0.999, 1e-8

    def __init__(self, dim: int, k: int, grid: list, cw: np.ndarray, lr0: float, total: int):
        self.k, self.grid, self.G = k, grid, len(grid)
        self.lam = np.repeat(np.array(grid, np.float32), k)  # per column of the stacked heads
        self.W = np.zeros((dim, self.G * k), np.float32)
        self.b = np.zeros(self.G * k, np.float32)
        self.mW, self.vW, self.mb, self.vb = (np.zeros_like(self.W), np.zeros_like(self.W), np.zeros_like(self.b),
                                              np.zeros_like(self.b))
        self.cw, self.lr0, self.total, self.step = cw, lr0, total, 0

    def update(self, Z: np.ndarray, Y: np.ndarray) -> None:
        """One Adam step on a mini-batch: standardised features Z, classes Y."""
        G, k, n = self.G, self.k, len(Y)
        logits = Z @ self.W + self.b
        L = logits.reshape(n, G, k)
        L = L - L.max(axis=2, keepdims=True)
        P = np.exp(L)
        P /= P.sum(axis=2, keepdims=True)
        P[np.arange(n), :, Y] -= 1.0
        wts = self.cw[Y][:, None, None] / n
        Gr = (P * wts).reshape(n, G * k)
        gW = Z.T @ Gr + self.lam * self.W
        gb = Gr.sum(0)
        self.step += 1
        step, total, b1, b2, eps = self.step, self.total, self.B1, self.B2, self.EPS
        lr = self.lr0 * 0.5 * (1 + np.cos(np.pi * min(step, total) / total))
        for param, grad, m, v in ((self.W, gW, self.mW, self.vW), (self.b, gb, self.mb, self.vb)):
            m *= b1
            m += (1 - b1) * grad
            v *= b2
            v += (1 - b2) * grad * grad
            param -= lr * (m / (1 - b1 ** step)) / (np.sqrt(v / (1 - b2 ** step)) + eps)

    def evaluate(self, Z, yy) -> list:
        """[(accuracy, cross entropy)] of each head on (Z, yy)."""
        from retrain.head import accuracy_ce, softmax

        logits = Z @ self.W + self.b
        return [accuracy_ce(softmax(logits[:, j * self.k:(j + 1) * self.k].astype(np.float64)), yy)
                for j in range(self.G)]

    def best(self, res: list) -> int:
        return min(range(self.G), key=lambda j: (res[j][1], -res[j][0]))

    def head(self, j: int, mu, sigma):
        from retrain.head import Head

        sl = slice(j * self.k, (j + 1) * self.k)
        return Head(self.W[:, sl].astype(np.float64), self.b[sl].astype(np.float64), mu, sigma)


def _train_group(heads: _Heads, st: dict, index: dict, gi: int, rng, batch: int, norm) -> int:
    """Mini-batches over the training rows of row group `gi`, shuffled: the number of rows."""
    p, g, _n = st["groups"][gi]
    code, yy = st["codes"][index[(p, g)]], st["labels"][index[(p, g)]]
    rows = np.nonzero(code == 0)[0]
    if not len(rows):
        return 0
    mu, sigma = norm
    store = st["store"]
    t = store.read_group(p, g, ["features"])
    f = t.column("features").combine_chunks()
    flat = f.values.to_numpy(zero_copy_only=False).reshape(len(f), store.dim)
    rows = rng.permutation(rows)
    for s in range(0, len(rows), batch):
        r = np.sort(rows[s:s + batch])
        heads.update((flat[r].astype(np.float32) - mu) / sigma, yy[r])
    return len(rows)


def _train_epochs(heads: _Heads, st: dict, sample: tuple, *, rng, batch: int, epochs: int, n_train: int,
                  norm, quiet: bool, history: list, log) -> list:
    """The epochs (see the module's docstring); each scored on the samples into `history`.
    Returns the last epoch's [(validation accuracy, cross entropy)] per head."""
    from retrain.progress import bar

    Zva, yva, Ztr, ytr = sample
    index = {(p, g): i for i, (p, g, _n) in enumerate(st["groups"])}
    with bar(total=epochs * n_train, desc="Training (streamed)", unit="row", quiet=quiet) as pbar:
        for epoch in range(epochs):
            order = rng.permutation(len(st["groups"]))
            for gi in order:
                rows = _train_group(heads, st, index, gi, rng, batch, norm)
                if rows:
                    pbar.update(rows)
            res_va = heads.evaluate(Zva, yva)
            res_tr = heads.evaluate(Ztr, ytr) if len(ytr) else [(np.nan, np.nan)] * heads.G
            for j, lam_j in enumerate(heads.grid):
                history.append({"step": heads.step, "epoch": epoch + 1, "l2": lam_j, "train_accuracy": res_tr[j][0],
                                "cross_entropy": res_tr[j][1], "validation_accuracy": res_va[j][0],
                                "validation_cross_entropy": res_va[j][1]})
            best = heads.best(res_va)
            log(f"  epoch {epoch + 1}: best L2 {heads.grid[best]:g}, validation accuracy {res_va[best][0]:.1%} "
                f"(cross entropy {res_va[best][1]:.4f})")
    return res_va


def _class_weights(cfg, st: dict, k: int) -> np.ndarray:
    if cfg.class_weights == "balanced":
        tc = np.maximum(st["train_counts"], 1)
        return (tc.sum() / (k * tc)).astype(np.float32)
    return np.ones(k, np.float32)


def train_streamed(plan, data, log):
    """The streamed optimiser (see the module's docstring). Returns (Head, info, history)."""
    from retrain.head import L2_GRID, one_blas_thread

    cfg, st = plan.cfg, data.stream
    t0 = time.perf_counter()
    k = len(data.labels)
    mu, sigma = st["mu"].astype(np.float32), st["sigma"].astype(np.float32)
    grid = [cfg.l2] if cfg.l2 is not None else sorted(L2_GRID, reverse=True)
    n_train = st["split_counts"]["train"]
    batch = int(min(STREAM_BATCH, max(16, n_train // 64)))
    epochs = STREAM_EPOCHS
    lr0 = cfg.learning_rate if cfg.learning_rate is not None else STREAM_LR
    heads = _Heads(st["store"].dim, k, grid, _class_weights(cfg, st, k), lr0,
                   total=max(1, epochs * -(-n_train // batch)))
    va, tr = data.parts["validation"], data.parts["train"]
    sample = (((data.X[va] - mu) / sigma).astype(np.float32), data.y[va],
              ((data.X[tr] - mu) / sigma).astype(np.float32), data.y[tr])
    history = []
    log(f"Training the final layer (streamed Adam, {epochs} epochs of {n_train} rows in batches of {batch}, "
        f"{len(grid)} L2 strength{'s' if len(grid) > 1 else ''} at once, chosen on a validation sample of {len(va)})")
    res_va = one_blas_thread(_train_epochs)(heads, st, sample, rng=np.random.default_rng(cfg.seed), batch=batch,
                                            epochs=epochs, n_train=n_train, norm=(mu, sigma), quiet=cfg.quiet,
                                            history=history, log=log)
    if not all(np.isfinite(ce) for _, ce in res_va):
        raise ConfigError("the streamed optimiser diverged: try a smaller --learning_rate")
    best = heads.best(res_va)
    head = heads.head(best, st["mu"], st["sigma"])
    seconds = time.perf_counter() - t0
    info = {"optimizer": "stream", "l2": grid[best], "epochs": epochs, "batch": batch, "steps": heads.step,
            "learning_rate": lr0, "class_weights": cfg.class_weights, "rows": st["split_counts"],
            "samples": {name: int(len(idx)) for name, idx in data.parts.items()},
            "grid": [{"l2": lam_j, "validation_accuracy": res_va[j][0], "validation_cross_entropy": res_va[j][1]}
                     for j, lam_j in enumerate(grid)],
            "rows_per_second": round(epochs * n_train / max(seconds, 1e-9), 1)}
    data.timings["train_s"] = round(seconds, 3)
    log(f"  chosen L2 {grid[best]:g}: validation accuracy {res_va[best][0]:.1%} on the sample, "
        f"{info['rows_per_second']:.0f} rows/s")
    return head, info, [h for h in history if h["l2"] == grid[best]]


def check_inputs(plan, log):
    """Photos for checking the written model against the head without the user's photos: the
    calibration photos shipped with retrain, and their features by the model's own backbone."""
    from retrain.architectures import calibration_files
    from retrain.bottlenecks import feature_session
    from retrain.images import load, normalize

    bb = plan.backbone
    files = calibration_files()[:8]
    imgs = np.stack([load(str(f), bb.image_size, bb.crop_fraction) for f in files])
    kind = "int8" if plan.precision == "int8" else "fp32"
    sess = feature_session(bb, provider="cpu", precision=kind, log=log)
    return imgs, np.arange(len(files)), sess(normalize(imgs, bb.mean, bb.std))
